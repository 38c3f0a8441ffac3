"""The real quickstart, as `make quickstart` runs it: real vLLM (CPU build) rollouts, and it must learn."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DISTRIBUTED_ENV

pytestmark = pytest.mark.slow

# The budget for the whole run on 2 CPU cores.
WALL_LIMIT_S = 300


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, repo_root):
    pytest.importorskip("vllm")
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    command = [os.path.join(os.path.dirname(sys.executable), "longctx-grpo"), "train"]
    command += ["configs/grpo/quickstart.yaml", "--output_dir", str(run_dir)]
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}  # a fresh shell, as `make quickstart`
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=2 * WALL_LIMIT_S)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-5000:]
    return run_dir, result.stderr + result.stdout, wall


def test_runs_within_budget_with_vllm_rollouts(quickstart_run):
    run_dir, log, wall = quickstart_run
    print(f"quickstart wall time: {wall:.0f} s")
    assert wall < WALL_LIMIT_S
    assert "Rollout plan: vLLM" in log and "KV cache released while training" in log  # the plan, logged at start
    assert json.loads((run_dir / "summary.json").read_text())["rollout_backend"] == "vllm"
    assert "it/s]" in log or "s/it]" in log  # the progress bar


def test_writes_run_files(quickstart_run):
    run_dir, _, _ = quickstart_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 80  # 400 steps, logged every 5
    assert all({"step", "reward", "loss", "peak_memory_mb"} <= r.keys() for r in records)
    assert (run_dir / "reward.png").stat().st_size > 10_000


def test_vllm_weights_follow_the_trainer(quickstart_run):
    # vLLM samples from the synced weights; stale weights would show as a growing log-prob gap to the trainer's.
    run_dir, _, _ = quickstart_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["sampling/sampling_logp_difference/mean"] for r in records]
    assert max(gaps) < 0.05, f"largest mean |logp_vllm - logp_trainer| {max(gaps):.3g}"


def test_it_learns(quickstart_run):
    run_dir, _, _ = quickstart_run
    summary = json.loads((run_dir / "summary.json").read_text())
    first, last = summary["reward_first_fifth"], summary["reward_last_fifth"]
    print(f"reward first fifth {first:.3f}, last fifth {last:.3f}")
    assert last > first + 0.15 and last > 1.5 * first


def test_saves_the_trained_model_where_the_summary_says(quickstart_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_longctx.tiny_models import save_tiny_model

    run_dir, _, _ = quickstart_run
    model_dir = Path(json.loads((run_dir / "summary.json").read_text())["model"])
    assert model_dir == run_dir / "model"
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith("_")]  # published, nothing left staged
    # The recipe's model: `builtin:tiny-qwen3` is built from the seed (0), so its initial weights can be rebuilt.
    initial = load_file(Path(save_tiny_model(tmp_path / "initial", seed=0)) / "model.safetensors")
    trained = load_file(model_dir / "model.safetensors")
    assert trained.keys() == initial.keys()
    unchanged = sorted(name for name in initial if torch.equal(trained[name], initial[name]))
    assert not unchanged, f"saved weights equal to the initial ones: {unchanged}"
    AutoModelForCausalLM.from_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir)("copy: a")["input_ids"]
