"""The quickstart stays up: 500 steps on CPU (real vLLM rollouts) without resident memory creeping up.

The run logs every step; each `metrics.jsonl` record carries `rss_gib`, the resident memory of the training process
and its descendants when the step was logged (`trl_longctx.metrics_callback.resident_memory_gib`).
"""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import DISTRIBUTED_ENV

pytestmark = pytest.mark.slow

STEPS = 500
BASELINE_STEP = 50  # after warm-up: allocator pools, vLLM's first batches, the optimizer state
GROWTH_LIMIT = 1.05
# Only stops a hung run: alone on 2 cores the run takes about 3 minutes, twice that when other work shares the cores.
TIMEOUT_S = 900


def test_resident_memory_flat_over_500_steps(tmp_path, repo_root):
    pytest.importorskip("vllm")
    run_dir = tmp_path / "run"
    # `longctx-grpo train ...` through its module, so that it also runs where the console script is not installed.
    command = [sys.executable, "-m", "trl_longctx.cli", "train", "configs/grpo/quickstart.yaml", "--max_steps"]
    command += [str(STEPS), "--logging_steps", "1", "--save_strategy", "no", "--output_dir", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-5000:]

    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(1, STEPS + 1))
    rss = {step: record["rss_gib"] for step, record in records.items()}
    baseline, end = rss[BASELINE_STEP], rss[STEPS]
    curve = ", ".join(f"{step}: {rss[step]:.3f}" for step in (1, 10, 50, 100, 200, 300, 400, 500))
    print(f"quickstart {STEPS} steps: {wall:.0f} s; RSS GiB by step {curve}; max {max(rss.values()):.3f}")
    assert end <= GROWTH_LIMIT * baseline, (
        f"resident memory grew from {baseline:.3f} GiB at step {BASELINE_STEP} to {end:.3f} GiB at step {STEPS} "
        f"(+{100 * (end / baseline - 1):.1f}%, limit +{100 * (GROWTH_LIMIT - 1):.0f}%); by step: {curve}"
    )
