"""Checkpoints are renamed into place once complete: a save that dies midway leaves nothing that resume would pick,
and a crash while a checkpoint replaces an older one of the same step leaves one complete copy that resume finds.

Resuming loads every torch-pickled file of our checkpoints with `torch.load(..., weights_only=True)`.
"""

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_longctx_grpo_trainer import make_trainer
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from trl_longctx import checkpoints
from trl_longctx.checkpoints import publish, recover_run_dir, save_final_model, staging_dir
from trl_longctx.fault_callbacks import fault_callbacks

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


class FileSystem:
    """`os` and `shutil` for `trl_longctx.checkpoints` that record each rename and removal and can crash at one."""

    def __init__(self, crash_at=None):
        self.crash_at, self.done = crash_at, []  # `crash_at(op, path, target)` -> True: raise before that operation

    def _step(self, op, path, target=None):
        if self.crash_at is not None and self.crash_at(op, Path(path), target and Path(target)):
            raise SaveCrash(f"killed before {op} {path}")
        self.done.append((op, Path(path).name))

    def replace(self, src, dst):
        self._step("replace", src, dst)
        os.replace(src, dst)

    def rmtree(self, path, *args, **kwargs):
        self._step("rmtree", path)
        shutil.rmtree(path, *args, **kwargs)

    def __getattr__(self, name):  # everything else is the real module's
        return getattr(os if hasattr(os, name) else shutil, name)


def use_file_system(monkeypatch, fs):
    monkeypatch.setattr(checkpoints, "os", fs)
    monkeypatch.setattr(checkpoints, "shutil", fs)


def write_checkpoint(folder: Path, version: str) -> None:
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt"):
        (folder / name).write_text(f"{version} {name}")


def version_of(folder: Path) -> str:
    """Which save wrote `folder`, checking that it is complete (both files, of one save)."""
    contents = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(contents) == ["model.safetensors", "optimizer.pt"], contents
    versions = {text.split()[0] for text in contents.values()}
    assert len(versions) == 1, contents
    return versions.pop()


# The renames and removals of a publish over an existing checkpoint-1, in order.
PUBLISH_OVER_EXISTING = [
    ("replace", "checkpoint-1"),  # the staged folder (named checkpoint-1 inside its staging folder) -> .ready
    ("replace", "checkpoint-1"),  # the earlier checkpoint-1 -> .replaced
    ("replace", "_checkpoint-1.ready"),  # the new one into place
    ("rmtree", "_checkpoint-1.replaced"),
]


@pytest.mark.parametrize("crash_before", range(len(PUBLISH_OVER_EXISTING)))
def test_a_crash_at_each_point_of_a_publish_over_an_earlier_checkpoint_leaves_one_complete(
    tmp_path, monkeypatch, crash_before
):
    # Where the real publish goes, then the same publish crashing before its operation number `crash_before`.
    traced_dir, run_dir = tmp_path / "traced", tmp_path / "run"
    for folder in (traced_dir, run_dir):
        write_checkpoint(folder / "checkpoint-1", "old")
        write_checkpoint(staging_dir(folder, 1) / "checkpoint-1", "new")
    traced = FileSystem()
    use_file_system(monkeypatch, traced)
    publish(staging_dir(traced_dir, 1) / "checkpoint-1", traced_dir / "checkpoint-1")
    assert traced.done == PUBLISH_OVER_EXISTING
    crashing = FileSystem(crash_at=lambda *_: len(crashing.done) == crash_before)
    use_file_system(monkeypatch, crashing)
    with pytest.raises(SaveCrash):
        publish(staging_dir(run_dir, 1) / "checkpoint-1", run_dir / "checkpoint-1")
    if crash_before == 2:  # the window: no checkpoint-1 on disk, only `.ready` (new) and `.replaced` (old)
        assert checkpoint_names(run_dir) == ["_checkpoint-1.partial", "_checkpoint-1.ready", "_checkpoint-1.replaced"]
        assert get_last_checkpoint(str(run_dir)) is None

    # What the next save (or the trainer, before a resume looks for the last checkpoint) runs first.
    use_file_system(monkeypatch, FileSystem())
    recover_run_dir(run_dir)
    assert checkpoint_names(run_dir) == ["checkpoint-1"]
    # The new one as soon as it was known complete (renamed to `.ready`), else the old one.
    assert version_of(run_dir / "checkpoint-1") == ("old" if crash_before == 0 else "new")
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-1")


def test_a_crash_while_removing_the_replaced_checkpoint_is_cleaned_up(tmp_path, monkeypatch):
    final = tmp_path / "checkpoint-1"
    write_checkpoint(final, "old")
    write_checkpoint(staging_dir(tmp_path, 1) / "checkpoint-1", "new")

    def half_removed(op, path, target):
        if op == "rmtree":
            (path / "optimizer.pt").unlink()  # killed in the middle of the removal
            return True
        return False

    use_file_system(monkeypatch, FileSystem(crash_at=half_removed))
    with pytest.raises(SaveCrash):
        publish(staging_dir(tmp_path, 1) / "checkpoint-1", final)
    use_file_system(monkeypatch, FileSystem())
    recover_run_dir(tmp_path)
    assert checkpoint_names(tmp_path) == ["checkpoint-1"] and version_of(final) == "new"


def crash_between_renames(monkeypatch, name):
    """Make the publish of `name` over an existing one crash after moving the old one aside, before the new is in."""
    fs = FileSystem(crash_at=lambda op, path, target: op == "replace" and path.name == f"_{name}.ready")
    use_file_system(monkeypatch, fs)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_crash_between_the_renames_over_an_earlier_run_then_next_save_and_resume_keep_it(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    full = make_trainer(tiny_model_dir, tmp_path / "full", **SETTINGS)
    full.train()
    run_dir = tmp_path / "crashed"
    earlier_run = make_trainer(tiny_model_dir, run_dir, **{**SETTINGS, "max_steps": 2, "seed": 1})
    earlier_run.train()  # an earlier run in this folder: its checkpoint-1 and checkpoint-2 are there
    earlier = sha(run_dir / "checkpoint-2" / "model.safetensors")

    crashed = make_trainer(tiny_model_dir, run_dir, **SETTINGS)
    crash_between_renames(monkeypatch, "checkpoint-2")
    with pytest.raises(SaveCrash):
        crashed.train()
    monkeypatch.undo()
    assert checkpoint_names(run_dir) == [
        "_checkpoint-2.partial",  # emptied by the first rename
        "_checkpoint-2.ready",
        "_checkpoint-2.replaced",
        "checkpoint-1",
    ]
    new = sha(run_dir / "_checkpoint-2.ready" / "model.safetensors")
    assert new != earlier
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-1")  # what a resume would take, unrepaired

    # The next save of another run in this folder (its own checkpoint-1) puts the complete checkpoint-2 in place.
    next_dir = tmp_path / "next"
    shutil.copytree(run_dir, next_dir)
    with caplog.at_level(logging.WARNING, logger="trl_longctx.checkpoints"):
        make_trainer(tiny_model_dir, next_dir, **{**SETTINGS, "max_steps": 1}).train()
    assert "_checkpoint-2.ready as checkpoint-2" in caplog.text
    assert checkpoint_names(next_dir) == ["checkpoint-1", "checkpoint-2"]
    assert {p.name for p in (next_dir / "checkpoint-2").iterdir()} >= CHECKPOINT_FILES
    assert sha(next_dir / "checkpoint-2" / "model.safetensors") == new

    # A resume: the fault callbacks, added when the trainer is built, repair the folder before it looks.
    resumed = make_trainer(tiny_model_dir, run_dir, **SETTINGS)
    for callback in fault_callbacks(resumed):
        resumed.add_callback(callback)
    assert checkpoint_names(run_dir) == ["checkpoint-1", "checkpoint-2"]
    resumed.train(resume_from_checkpoint=True)
    expected, actual = logged(full), logged(resumed)
    assert sorted(actual) == [1, 2, 3]  # steps 1-2 from checkpoint-2's trainer state, step 3 trained
    for key in COMPARED:
        assert actual[3][key] == expected[3][key], f"step 3 {key}: {actual[3][key]} != {expected[3][key]}"
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_save_final_model_publishes_the_trained_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=2)
    trainer.train()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.bin").write_text("an earlier run's model")
    path = save_final_model(trainer)
    assert path == tmp_path / "model"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("_")) == []  # nothing staged is left
    assert not (path / "stale.bin").exists()
    saved = load_file(path / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    changed = [name for name in initial if not torch.equal(saved[name], initial[name])]
    assert changed == list(initial), f"unchanged by training: {sorted(set(initial) - set(changed))}"
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(reloaded.state_dict()[name], p.detach()), name
    assert AutoTokenizer.from_pretrained(path).get_vocab() == trainer.processing_class.get_vocab()
