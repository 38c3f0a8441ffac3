"""Checkpoints are renamed into place once complete: a save that dies midway leaves nothing that resume would pick.

Resuming loads every torch-pickled file of our checkpoints with `torch.load(..., weights_only=True)`.
"""

import logging
from pathlib import Path

import pytest
import torch
from test_longctx_grpo_trainer import make_trainer
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from trl_longctx.checkpoints import publish, staging_dir

CHECKPOINT_FILES = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
# Logged values that depend on the weights, the data order and the sampling RNG.
COMPARED = ("loss", "reward", "grad_norm", "entropy", "completions/mean_length")
SETTINGS = {"max_steps": 3, "save_strategy": "steps", "save_steps": 1, "learning_rate": 5e-3}


class SaveCrash(Exception):
    """Stands for a crash in the middle of writing a checkpoint."""


class MarkStepBest(TrainerCallback):
    """Marks one step as the best so far (as an evaluation would), so that transformers records its checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            state.best_global_step = self.step


def crash_while_saving(trainer, step):
    """Make the save of `step` raise after the weights, optimizer and scheduler are written, before the RNG state."""
    original = trainer._save_rng_state

    def save_rng_state(output_dir):
        if trainer.state.global_step == step:
            raise SaveCrash(f"killed while saving step {step}")
        original(output_dir)

    trainer._save_rng_state = save_rng_state


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and "checkpoint" in p.name)


def logged(trainer) -> dict[int, dict]:
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def test_complete_checkpoints_rotation_and_best_path(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, **SETTINGS, save_total_limit=2)
    trainer.add_callback(MarkStepBest(1))
    trainer.train()
    # Rotation ran on the real folder: the best (step 1) and the latest are kept, step 2 is not, nothing staged is left.
    assert checkpoint_names(tmp_path) == ["checkpoint-1", "checkpoint-3"]
    for name in ("checkpoint-1", "checkpoint-3"):
        assert {p.name for p in (tmp_path / name).iterdir()} >= CHECKPOINT_FILES
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    state = (tmp_path / "checkpoint-3" / "trainer_state.json").read_text()
    assert f'"best_model_checkpoint": "{tmp_path / "checkpoint-1"}"' in state
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")


def test_crash_mid_save_leaves_no_checkpoint_then_resume_matches_uninterrupted_run(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    full = make_trainer(tiny_model_dir, tmp_path / "full", **SETTINGS)
    full.train()

    run_dir = tmp_path / "crashed"
    crashed = make_trainer(tiny_model_dir, run_dir, **SETTINGS)
    crash_while_saving(crashed, step=2)
    with pytest.raises(SaveCrash):
        crashed.train()
    partial = staging_dir(run_dir, 2) / "checkpoint-2"
    assert checkpoint_names(run_dir) == ["_checkpoint-2.partial", "checkpoint-1"]
    assert {"model.safetensors", "optimizer.pt"} <= {p.name for p in partial.iterdir()}  # really half-written
    assert "rng_state.pth" not in {p.name for p in partial.iterdir()}
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-1")

    loads = []
    original_load = torch.load

    def load(f, *args, **kwargs):
        # What the caller asked for; a torch >= 2.6 default (no `weights_only`, no `pickle_module`) is True.
        asked = kwargs.pop("weights_only", None)
        loads.append((Path(f).name, asked if asked is not None else kwargs.get("pickle_module") is None))
        return original_load(f, *args, weights_only=True, **kwargs)  # and the file must load that way

    monkeypatch.setattr(torch, "load", load)
    resumed = make_trainer(tiny_model_dir, run_dir, **SETTINGS)
    with caplog.at_level(logging.WARNING, logger="trl_longctx.checkpoints"):
        resumed.train(resume_from_checkpoint=True)

    assert {name for name, _ in loads} == {"rng_state.pth", "optimizer.pt", "scheduler.pt"}  # no training_args.bin
    assert all(safe for _, safe in loads), loads
    assert "_checkpoint-2.partial" in caplog.text  # removed at the next save, with a warning
    assert checkpoint_names(run_dir) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    expected, actual = logged(full), logged(resumed)
    assert sorted(actual) == [1, 2, 3]  # step 1 from the checkpoint's trainer state, steps 2-3 trained again
    for step in (2, 3):
        for key in COMPARED:
            assert actual[step][key] == expected[step][key], (
                f"step {step} {key}: {actual[step][key]} != {expected[step][key]}"
            )
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_publish_replaces_a_checkpoint_of_an_earlier_run(tmp_path):
    final = tmp_path / "checkpoint-1"
    final.mkdir()
    (final / "old.bin").write_text("earlier run")
    staged = staging_dir(tmp_path, 1) / "checkpoint-1"
    staged.mkdir(parents=True)
    (staged / "new.bin").write_text("this run")
    publish(staged, final)
    assert [p.name for p in final.iterdir()] == ["new.bin"]
    assert checkpoint_names(tmp_path) == ["_checkpoint-1.partial", "checkpoint-1"]  # the caller removes the parent
