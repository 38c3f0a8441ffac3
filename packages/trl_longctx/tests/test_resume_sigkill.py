"""Kill a `longctx-grpo train` run with SIGKILL mid-run, resume it from its last checkpoint: same metrics after."""

import json
import os
import signal
import subprocess
import sys

import yaml
from test_cli import RECIPE

# Logged values that depend on the weights, the data order and the sampling RNG; timings are left out.
COMPARED = ("reward", "loss", "entropy", "completions/mean_length", "grad_norm", "learning_rate")
KILL_AT_STEP = 5

CHILD = """
import os, signal, sys
from trl_longctx import metrics_callback
from trl_longctx.cli import main

kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
original = metrics_callback.RunFilesCallback.on_log

def on_log(self, args, state, control, logs=None, **kwargs):
    if state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a crash or an OOM kill
    return original(self, args, state, control, logs=logs, **kwargs)

metrics_callback.RunFilesCallback.on_log = on_log
main(sys.argv[1:])
"""


def run(recipe, *flags, kill_at=0):
    return subprocess.run(
        [sys.executable, "-c", CHILD, "train", str(recipe), *flags],
        env={**os.environ, "KILL_AT_STEP": str(kill_at)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def records(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    settings = {**RECIPE, "max_steps": 6, "save_strategy": "steps", "save_steps": 2, "learning_rate": 5e-3}
    for name in ("full", "crashed"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / name)}))

    full = run(tmp_path / "full.yaml")
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = run(tmp_path / "crashed.yaml", kill_at=KILL_AT_STEP)
    assert crashed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "crashed"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (run_dir / "summary.json").exists()

    resumed = run(tmp_path / "crashed.yaml", "--resume_from_checkpoint", str(run_dir / "checkpoint-4"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = records(tmp_path / "full"), records(run_dir)
    assert sorted(actual) == [1, 2, 3, 4, 5, 6]  # steps up to the checkpoint kept, the rest logged again
    for step in (5, 6):
        for key in COMPARED:
            assert actual[step][key] == expected[step][key], (
                f"step {step} {key}: {actual[step][key]} != {expected[step][key]}"
            )
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
