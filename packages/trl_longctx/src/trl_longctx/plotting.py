"""Plots of a run's metrics."""

from __future__ import annotations

import os
from pathlib import Path


def plot_reward_curve(records: list[dict], path: str | os.PathLike, window: int = 5) -> Path:
    """Plot reward per logged step, with a moving average over `window` points, to a PNG.

    Args:
        records: Dicts with `step` and `reward` (as in `metrics.jsonl`).
        path: Output PNG; written to a temporary name first, then renamed.
        window: Width of the moving average.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    rewards = [r["reward"] for r in records]
    smooth = [
        sum(rewards[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(rewards))
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, rewards, alpha=0.35, label="reward")
    ax.plot(steps, smooth, linewidth=2, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO reward")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as a PNG under a temporary name, close it, then rename it to `path`."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
