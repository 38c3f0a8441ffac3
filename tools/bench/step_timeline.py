"""Memory timeline of one training step by component, from the CUDA caching allocator's own trace (a helper of
`step_memory_timeline.py`; tested by `tests/test_step_timeline.py`).

`record_step(fn)` runs `fn` (one step) under `torch.cuda.memory._record_memory_history`, with `phase_marker(name)`
calls inside it marking where the forward, the log-prob computation, the backward and the optimizer step begin.
`step_components(recording)` then pairs every allocation with its free and files it under a component by when it was
allocated and how long it lived:

- **resident**: allocated before the step (weights, LoRA parameters, optimizer states, gradients of the last step);
  a resident block freed during the step (e.g. `zero_grad(set_to_none=True)`) leaves the band then;
- **saved for backward**: allocated during the decoder's forward and still alive when the backward starts (the
  checkpointed layer inputs, and whatever else autograd keeps from the forward);
- **forward working set**: allocated and freed during the decoder's forward;
- **log-prob path**: allocated while the log-probs are computed from the last hidden state (logits or their chunks,
  tiles, what the log-prob backward keeps);
- **backward**: allocated during the backward (layer recomputes, their intermediates, gradients);
- **optimizer**: allocated during the optimizer step.

The phases come from the markers alone (no stack parsing): a marker allocates one small block from a function of a
known name, found in the trace by its Python frame. The sum of the components at any point is what the allocator had
handed out (`torch.cuda.memory_allocated`), so the top of the stack peaks at `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

GIB = 2**30
COMPONENTS = (
    "resident (weights, LoRA, optimizer states)",
    "saved for backward (checkpointed inputs)",
    "forward working set",
    "log-prob path",
    "backward (recompute + gradients)",
    "optimizer",
)
PHASES = ("forward", "log-probs", "backward", "optimizer")
_MARKER_FUNCTION = "_timeline_phase_marker"
_phase_names: list[str] = []
_recording = [False]  # inside record_step


def _timeline_phase_marker() -> None:
    import torch

    torch.empty(1, dtype=torch.uint8, device="cuda")  # one 512-byte block, freed at once; found by this frame's name


def phase_marker(name: str) -> None:
    """Mark the start of phase `name` (one of `PHASES`) inside `record_step`'s function; a no-op outside it."""
    if name not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got {name!r}.")
    if _recording[0]:
        _phase_names.append(name)
        _timeline_phase_marker()


def record_step(fn, *, max_entries: int = 5_000_000) -> dict[str, Any]:
    """Run `fn()` with the allocator's trace on; return what `step_components` needs.

    Returns:
        `{"resident_bytes", "peak_bytes", "phases", "events"}`: bytes allocated before `fn`, the allocator's peak
        during it (`max_memory_allocated`), the marked phase names in order, and the trace events of the current
        device (dicts with `action`, `addr`, `size` and `marker: bool`).

    Raises:
        RuntimeError: Without CUDA (the trace is the CUDA caching allocator's).
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("record_step needs CUDA: it reads the CUDA caching allocator's trace.")
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _phase_names.clear()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=max_entries)
    _recording[0] = True
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        _recording[0] = False
        torch.cuda.memory._record_memory_history(enabled=None)
    events = [
        {"action": e["action"], "addr": e["addr"], "size": e["size"],
         "marker": any(f.get("name") == _MARKER_FUNCTION for f in e.get("frames", ()))}
        for e in snapshot["device_traces"][torch.cuda.current_device()]
        if e["action"] in ("alloc", "free_completed")
    ]  # fmt: skip
    return {"resident_bytes": resident, "peak_bytes": torch.cuda.max_memory_allocated(),
            "phases": list(_phase_names), "events": events}  # fmt: skip


def _component(phase: str | None, freed_at: int | None, backward_at: int | None) -> str:
    if phase in (None, "forward"):
        alive_at_backward = backward_at is not None and (freed_at is None or freed_at > backward_at)
        return COMPONENTS[1] if alive_at_backward else COMPONENTS[2]
    return {"log-probs": COMPONENTS[3], "backward": COMPONENTS[4], "optimizer": COMPONENTS[5]}[phase]


def step_components(recording: dict[str, Any], max_points: int = 2000) -> dict[str, Any]:
    """Bytes alive per component over the step (pure Python; `recording` as `record_step` returns it).

    Returns:
        `{"x": [fraction of the step's events, 0..1], "GiB": {component: [...]}, "phase_starts": {phase: x},
        "peak_GiB", "peak_x", "measured_peak_GiB", "peak_by_component_GiB": {component: GiB at the peak}}`, at most
        `max_points` points (the peak always among them).
    """
    events, names = recording["events"], iter(recording["phases"])
    phase, phase_starts = None, {}
    intervals: list[list] = []  # [start index, end index or None, size, phase]
    live: dict[int, int] = {}
    resident_frees: list[tuple[int, int]] = []
    markers: set[int] = set()
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            if e["marker"]:
                phase = next(names, phase)
                phase_starts.setdefault(phase, i)
                markers.add(e["addr"])
                continue
            live[e["addr"]] = len(intervals)
            intervals.append([i, None, e["size"], phase])
        elif e["addr"] in live:
            intervals[live.pop(e["addr"])][1] = i
        elif e["addr"] in markers:
            markers.discard(e["addr"])
        else:
            resident_frees.append((i, e["size"]))  # allocated before the step
    n = max(len(events), 1)
    backward_at = phase_starts.get("backward")
    deltas = {c: [0] * (n + 1) for c in COMPONENTS}
    deltas[COMPONENTS[0]][0] += recording["resident_bytes"]
    for i, size in resident_frees:
        deltas[COMPONENTS[0]][i] -= size
    for start, end, size, alloc_phase in intervals:
        component = _component(alloc_phase, end, backward_at)
        deltas[component][start] += size
        if end is not None:
            deltas[component][end] -= size
    totals, running = {c: [] for c in COMPONENTS}, dict.fromkeys(COMPONENTS, 0)
    for i in range(n):
        for c in COMPONENTS:
            running[c] += deltas[c][i]
            totals[c].append(running[c])
    total = [sum(totals[c][i] for c in COMPONENTS) for i in range(n)]
    peak_i = max(range(n), key=total.__getitem__)
    step = max(1, n // max_points)
    points = sorted(set(range(0, n, step)) | {peak_i, n - 1})
    return {
        "x": [i / n for i in points],
        "GiB": {c: [totals[c][i] / GIB for i in points] for c in COMPONENTS},
        "phase_starts": {p: i / n for p, i in phase_starts.items()},
        "peak_GiB": total[peak_i] / GIB,
        "peak_x": peak_i / n,
        "measured_peak_GiB": recording.get("peak_bytes", 0) / GIB,
        "peak_by_component_GiB": {c: totals[c][peak_i] / GIB for c in COMPONENTS},
    }


def plot_memory_timelines(panels: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """One PNG, one panel per `{label: step_components(...)}`, stacked areas by component on a shared GiB axis.

    Written to a temporary name, then renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trl_longctx.plotting import save_figure

    colors = ["#9e9e9e", "#1f77b4", "#aec7e8", "#d62728", "#ff7f0e", "#2ca02c"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), dpi=110, sharey=True, squeeze=False)
    for ax, (label, series) in zip(axes[0], panels.items(), strict=True):
        ax.stackplot(series["x"], *[series["GiB"][c] for c in COMPONENTS], labels=COMPONENTS, colors=colors)
        for phase, x in series["phase_starts"].items():
            ax.axvline(x, color="black", linewidth=0.6, linestyle=":")
            ax.text(x, 0.98, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        ax.annotate(f"peak {series['peak_GiB']:.1f} GiB", (series["peak_x"], series["peak_GiB"]),
                    xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)  # fmt: skip
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("progress through the step (allocator events)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GPU memory allocated, GiB")
    axes[0][-1].legend(loc="upper right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
