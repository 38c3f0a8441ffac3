"""Atomic checkpoints: a `checkpoint-N` folder is either complete or absent, never half-written.

Transformers' `Trainer._save_checkpoint` writes `checkpoint-N` in place, so a crash mid-save leaves a partial folder
that `resume_from_checkpoint=True` (`transformers.trainer_utils.get_last_checkpoint`) would resume from. Here the whole
save (transformers' and TRL's files, every process's RNG state) goes into a staging folder `_checkpoint-N.partial/`
next to the final one; once it is complete it is fsync'd and renamed to `checkpoint-N` in one `os.replace`, then old
checkpoints are rotated. The leading underscore keeps staging folders out of `get_last_checkpoint`'s regex
(`^checkpoint-(\\d+)$`), rotation's glob (`checkpoint-*`) and the Hub push's `ignore_patterns` (`_*`). Staging
folders left by a killed save are removed, with a warning, at the next save.
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
REPLACED_SUFFIX = ".replaced"
_STALE = re.compile(rf"^_{PREFIX_CHECKPOINT_DIR}-\d+({re.escape(STAGING_SUFFIX)}|{re.escape(REPLACED_SUFFIX)})$")


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The staging folder of the checkpoint of `step`; the save writes `<staging>/checkpoint-<step>/`."""
    return Path(run_dir) / f"_{PREFIX_CHECKPOINT_DIR}-{step}{STAGING_SUFFIX}"


def remove_stale_staging(run_dir: str | os.PathLike) -> list[Path]:
    """Remove staging folders that a killed save left in `run_dir`; return them."""
    run_dir = Path(run_dir)
    stale = sorted(p for p in run_dir.iterdir() if p.is_dir() and _STALE.match(p.name)) if run_dir.is_dir() else []
    for path in stale:
        logger.warning("Removing %s: an unfinished checkpoint save (the run was stopped while saving).", path)
        shutil.rmtree(path)
    return stale


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
    """Rename the complete folder `staged` to `final` (replacing an older `final`), durably.

    A directory can only be renamed over an empty one, so an existing `final` (left by an earlier run in the same
    output folder) is first moved aside and deleted after the rename.
    """
    fsync_tree(staged)
    replaced = final.with_name(f"_{final.name}{REPLACED_SUFFIX}")
    if final.exists():
        logger.warning("Replacing %s, written by an earlier run in this output folder.", final)
        os.replace(final, replaced)
    os.replace(staged, final)
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
        remove_stale_staging(run_dir)
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
