"""Atomic checkpoints: a `checkpoint-N` folder is either complete or absent, never half-written.

Transformers' `Trainer._save_checkpoint` writes `checkpoint-N` in place, so a crash mid-save leaves a partial folder
that `resume_from_checkpoint=True` (`transformers.trainer_utils.get_last_checkpoint`) would resume from. Here the whole
save (transformers' and TRL's files, every process's RNG state) goes into a staging folder `_checkpoint-N.partial/`
next to the final one. Once complete it is fsync'd and published (`publish`) in renames that a crash at any point
leaves recoverable:

1. `_checkpoint-N.partial/checkpoint-N` -> `_checkpoint-N.ready`: from here on the new checkpoint is known complete.
2. an existing `checkpoint-N` (an earlier run's, in the same output folder) -> `_checkpoint-N.replaced`;
3. `_checkpoint-N.ready` -> `checkpoint-N`; then `_checkpoint-N.replaced` is deleted.

A directory cannot be renamed over a non-empty one, so between 2 and 3 there is no `checkpoint-N`: a crash there leaves
`.ready` (new, complete) and `.replaced` (old, complete). `recover_run_dir`, run at every save and (through
`trl_longctx.fault_callbacks`) when the trainer is built, before a resume looks for the last checkpoint, finishes such
a publish; only then are unfinished `.partial` folders deleted. So every crash point leaves a complete `checkpoint-N`
(the new one from step 1 on, else the old one), and the next save's cleanup never deletes the only copy.

The leading underscore keeps these folders out of `get_last_checkpoint`'s regex (`^checkpoint-(\\d+)$`), rotation's
glob (`checkpoint-*`) and the Hub push's `ignore_patterns` (`_*`). The final model (`save_final_model`) is published
the same way, as `model/`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".partial"
READY_SUFFIX = ".ready"
REPLACED_SUFFIX = ".replaced"
# Where `save_final_model` publishes the trained model, in the run's output folder.
FINAL_MODEL_DIR = "model"
# The published folders whose staging this module owns: `checkpoint-N` and the final model.
_NAME = rf"(?P<name>{PREFIX_CHECKPOINT_DIR}-\d+|{FINAL_MODEL_DIR})"
_STAGING = re.compile(rf"^_{_NAME}{re.escape(STAGING_SUFFIX)}$")
_READY = re.compile(rf"^_{_NAME}{re.escape(READY_SUFFIX)}$")
_REPLACED = re.compile(rf"^_{_NAME}{re.escape(REPLACED_SUFFIX)}$")


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The staging folder of the checkpoint of `step`; the save writes `<staging>/checkpoint-<step>/`."""
    return Path(run_dir) / f"_{PREFIX_CHECKPOINT_DIR}-{step}{STAGING_SUFFIX}"


def _sibling(final: Path, suffix: str) -> Path:
    return final.with_name(f"_{final.name}{suffix}")


def _matching(run_dir: Path, pattern: re.Pattern) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and pattern.match(p.name))


def recover_interrupted_publish(run_dir: str | os.PathLike) -> list[Path]:
    """Finish the publishes that a crash interrupted in `run_dir`; return the folders put (back) in place.

    A `_<name>.ready` folder is a complete save (it is renamed so only once fsync'd), so it becomes `<name>`, replacing
    an older `<name>`. A `_<name>.replaced` folder without one is the previous `<name>`, moved aside: deleted if
    `<name>` exists, else (it cannot happen through `publish` alone) renamed back, being complete.
    """
    run_dir = Path(run_dir)
    recovered = []
    for ready in _matching(run_dir, _READY):
        final = run_dir / _READY.match(ready.name)["name"]
        logger.warning("Publishing %s as %s: a crash interrupted its save after it was complete.", ready, final.name)
        _swap_in(ready, final)
        recovered.append(final)
    for replaced in _matching(run_dir, _REPLACED):
        final = run_dir / _REPLACED.match(replaced.name)["name"]
        if final.exists():
            shutil.rmtree(replaced)
        else:
            logger.warning("Restoring %s as %s: it was moved aside by an interrupted save.", replaced, final.name)
            os.replace(replaced, final)
            _fsync(run_dir)
            recovered.append(final)
    return recovered


def remove_stale_staging(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the staging folders that a killed save left unfinished in `run_dir`; return them.

    Call `recover_interrupted_publish` first: it finishes the saves that were complete.
    """
    stale = _matching(Path(run_dir), _STAGING)
    for path in stale:
        logger.warning("Removing %s: an unfinished save (the run was stopped while saving).", path)
        shutil.rmtree(path)
    return stale


def recover_run_dir(run_dir: str | os.PathLike) -> list[Path]:
    """Finish the interrupted publishes of `run_dir`, then remove unfinished staging; return the recovered folders.

    Run it on the main process only, with no save under way in `run_dir`.
    """
    recovered = recover_interrupted_publish(run_dir)
    remove_stale_staging(run_dir)
    return recovered


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (and `root` itself) to disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Rename the complete folder `staged` to `final` (replacing an older `final`), durably (see the module docstring).

    A crash at any point leaves either `final` complete or a `_<final>.ready` that `recover_interrupted_publish` puts
    in place; the old `final` is deleted only once the new one is in place.
    """
    fsync_tree(staged)
    ready = _sibling(final, READY_SUFFIX)
    os.replace(staged, ready)
    _fsync(final.parent)  # durable before an older `final` is moved aside
    _swap_in(ready, final)


def _swap_in(ready: Path, final: Path) -> None:
    """Put the complete folder `ready` in place as `final`. Idempotent: a crash at any point can rerun it."""
    replaced = _sibling(final, REPLACED_SUFFIX)
    if replaced.exists() and final.exists():
        shutil.rmtree(replaced)  # left by an earlier swap that finished its rename
    if final.exists():
        logger.warning("Replacing %s, written by an earlier run in this output folder.", final)
        os.replace(final, replaced)
    os.replace(ready, final)
    _fsync(final.parent)
    if replaced.exists():
        shutil.rmtree(replaced)


@contextmanager
def atomic_checkpoint(trainer, trial=None) -> Iterator[None]:
    """Make the `_save_checkpoint` run in the body write `checkpoint-N` atomically (see the module docstring).

    Within the body, `trainer._get_output_dir` returns the staging folder, so every path that transformers and TRL
    build for the checkpoint lands there, on every process. Their rotation sees only the staged checkpoint and keeps
    it; the real rotation runs after the rename. A Hub push of the checkpoint is replayed from the final folder.
    If the body raises, nothing is renamed and the staging folder stays until the next save removes it.

    Args:
        trainer: A `transformers.Trainer` (here a `LongContextGRPOTrainer`).
        trial: The hyperparameter-search trial passed to `_save_checkpoint`, if any.

    Example:
        >>> def _save_checkpoint(self, model, trial):
        ...     with atomic_checkpoint(self, trial):
        ...         super()._save_checkpoint(model, trial)
    """
    args, state = trainer.args, trainer.state
    run_dir = Path(trainer._get_output_dir(trial=trial))
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    staging, final = staging_dir(run_dir, state.global_step), run_dir / name
    if args.should_save:
        recover_run_dir(run_dir)
    trainer.accelerator.wait_for_everyone()  # no process writes into a staging folder that is being removed

    pushes: list[str] = []
    trainer._get_output_dir = lambda trial=None: str(staging)
    trainer._push_from_checkpoint = pushes.append
    try:
        yield
    finally:
        del trainer._get_output_dir, trainer._push_from_checkpoint  # back to the class's methods

    trainer.accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are written
    if state.best_model_checkpoint == str(staging / name):  # set by the body when this step is the best one
        state.best_model_checkpoint = str(final)
        if args.should_save:
            state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
    if args.should_save:
        publish(staging / name, final)
        staging.rmdir()
        # transformers' own call, on the real folder: it saw only the staged checkpoint.
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=True,
        )
    trainer.accelerator.wait_for_everyone()  # no process reads `checkpoint-N` before it exists
    for _ in pushes:
        trainer._push_from_checkpoint(str(final))


def save_final_model(trainer, run_dir: str | os.PathLike | None = None) -> Path:
    """Save the trained model (or adapter) and its tokenizer with `trainer.save_model` to `<run_dir>/model`, atomically.

    Call it on every process (FSDP and DeepSpeed gather the weights); the main process writes. The folder is staged
    as `_model.partial/` and published like a checkpoint, replacing the `model/` of an earlier run only once complete.

    Args:
        trainer: A `transformers.Trainer` after `train()`.
        run_dir: The folder to save under; default `trainer.args.output_dir`.

    Returns:
        The path of the published folder, `<run_dir>/model`.

    Example:
        >>> trainer.train()
        >>> save_final_model(trainer)  # runs/x/model, loadable with from_pretrained
    """
    run_dir = Path(trainer.args.output_dir if run_dir is None else run_dir)
    final = run_dir / FINAL_MODEL_DIR
    staging = _sibling(final, STAGING_SUFFIX)
    if trainer.args.should_save:
        recover_run_dir(run_dir)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()  # every process's part of the save is done
    if trainer.args.should_save:
        publish(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final
