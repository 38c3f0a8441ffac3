"""Callbacks that end a failing or preempted run cleanly instead of losing work or skipping steps forever.

`fault_callbacks(trainer)` returns them; the trainer adds them when it is built:

- `NonFiniteStopCallback`: after every optimizer update, the trainable weights are checked; a NaN or Inf weight stops
  the run (`NonFiniteError` naming the parameter and the step) before it is checkpointed. With
  `skip_nonfinite_steps=True`, `max_consecutive_nonfinite` skipped steps in a row stop it too: a run whose loss is
  non-finite step after step would otherwise skip every step until `max_steps`.
- `PreemptionCallback`: on SIGTERM or SIGINT the current optimizer step is finished, a checkpoint is written (the
  trainer's own atomic `_save_checkpoint`), training stops and `train()` raises `TrainingPreempted`, a `SystemExit`
  with the shell's code for a signal (128 + its number: 143 for SIGTERM, 130 for SIGINT), so a scheduler sees a
  stopped job, not a finished one, and nothing after `train()` (a final save, a push) runs on a half-trained model.
  `resume_from_checkpoint` then continues exactly where it stopped. A second signal exits at once.

`fault_callbacks` also finishes a checkpoint publish that a crash interrupted (`checkpoints.recover_run_dir`), so
that a resume finds that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import recover_run_dir
from .guards import NonFiniteError, describe_nonfinite

logger = logging.getLogger(__name__)

# Skipped steps in a row (non-finite loss, `skip_nonfinite_steps=True`) that stop the run: one or two can be a bad
# batch; three in a row with finite weights is a run that will not recover by itself.
MAX_CONSECUTIVE_NONFINITE = 3
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The per-micro-step metric that `LongContextGRPOTrainer.compute_loss` appends (1.0: that loss was skipped).
NONFINITE_METRIC = "nonfinite_skipped"


class TrainingPreempted(SystemExit):
    """Training stopped on a signal after writing a checkpoint; `code` is 128 + the signal number.

    A `SystemExit`: a script that does not catch it exits with that code and no traceback, and `except Exception`
    does not swallow it. Catch it to act on a preemption (e.g. requeue the job).

    Attributes:
        signal_number: The signal received (`signal.SIGTERM`, `signal.SIGINT`).
        step: The last training step done; its checkpoint is `checkpoint`.
        checkpoint: The folder to resume from (`resume_from_checkpoint=checkpoint`).
    """

    def __init__(self, signal_number: int, step: int, checkpoint: str):
        super().__init__(128 + signal_number)
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint

    def __str__(self) -> str:
        return (
            f"Training stopped by {signal.Signals(self.signal_number).name} after step {self.step}; checkpoint "
            f"{self.checkpoint} (resume with resume_from_checkpoint={self.checkpoint!r}). Exit code {self.code}."
        )


def fault_callbacks(
    trainer,
    *,
    max_consecutive_nonfinite: int = MAX_CONSECUTIVE_NONFINITE,
    signals: Sequence[int] = PREEMPTION_SIGNALS,
) -> list[TrainerCallback]:
    """The fault callbacks of `trainer`; call it in the trainer's `__init__`, after TRL's, and add them last.

    On the main process it first finishes a checkpoint publish that a crash interrupted in `output_dir`, so that
    `resume_from_checkpoint=True` finds that checkpoint.

    Args:
        trainer: A `LongContextGRPOTrainer` (its `args`, `state`, `accelerator`, `model`, `_metrics` are read).
        max_consecutive_nonfinite: Skipped steps in a row that stop the run (with `skip_nonfinite_steps=True`).
        signals: Signals that checkpoint and stop the run; `()` leaves every signal's handling as it is.

    Returns:
        `[NonFiniteStopCallback, PreemptionCallback]`.

    Raises:
        ValueError: If `max_consecutive_nonfinite` is not an integer >= 1.

    Example:
        >>> for callback in fault_callbacks(trainer):
        ...     trainer.add_callback(callback)
    """
    callbacks = [NonFiniteStopCallback(trainer, max_consecutive_nonfinite), PreemptionCallback(trainer, signals)]
    if trainer.args.should_save:
        recover_run_dir(trainer.args.output_dir)
    trainer.accelerator.wait_for_everyone()  # no process looks for the last checkpoint before it is back
    return callbacks


def _agreed(trainer, value: float) -> float:
    """The largest of `value` over the processes (`value` itself in a one-process run), so all ranks decide alike."""
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.gather(torch.tensor([value], device=accelerator.device)).max())


class NonFiniteStopCallback(TrainerCallback):
    """Stop the run on non-finite weights after an update, or on too many consecutive skipped steps.

    The weight check costs one fp32 sum per trainable tensor (no copy) and one host sync per optimizer step; only
    when a sum is not finite are the tensors scanned to name the bad ones. Each process checks what it holds (its
    FSDP/ZeRO-3 shard) and all stop together. The skipped steps are read from the per-micro-step `nonfinite_skipped`
    values that the trainer records with `skip_nonfinite_steps=True`; a step counts as skipped if any of its
    micro-steps was.

    Args:
        trainer: The trainer whose weights and metrics are read.
        max_consecutive: Skipped steps in a row that stop the run.

    Raises:
        ValueError: If `max_consecutive` is not an integer >= 1.
    """

    def __init__(self, trainer, max_consecutive: int = MAX_CONSECUTIVE_NONFINITE):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive_nonfinite must be an integer >= 1, got {max_consecutive!r}.")
        self._trainer, self.max_consecutive = trainer, max_consecutive
        self._seen = 0
        self.skipped_steps: list[int] = []  # the current run of consecutive skipped steps

    def _skip_values(self) -> list[float]:
        return self._trainer._metrics["train"].get(NONFINITE_METRIC, [])

    def on_train_begin(self, args, state, control, **kwargs):
        self.skipped_steps = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._seen = len(self._skip_values())  # TRL clears the lists when it logs, after `on_step_end`

    def on_step_end(self, args, state, control, **kwargs):
        self.check_weights(state.global_step)
        skipped = any(value > 0 for value in self._skip_values()[self._seen :])
        self.skipped_steps = [*self.skipped_steps, state.global_step] if skipped else []
        if len(self.skipped_steps) >= self.max_consecutive:
            first, last = self.skipped_steps[0], self.skipped_steps[-1]
            raise NonFiniteError(
                f"Training steps {first}-{last} ({len(self.skipped_steps)} in a row) were skipped for a non-finite "
                f"loss (skip_nonfinite_steps=True); the run stops at max_consecutive_nonfinite="
                f"{self.max_consecutive} instead of skipping every later step. The weights are finite, so the loss's "
                "inputs are not: the warnings above name the tensor (log-probs, loss) of each step; check the rewards "
                "and the model's numerics (dtype, learning_rate)."
            )

    def check_weights(self, step: int) -> None:
        """Raise if a trainable weight is NaN or Inf (on any process) after the optimizer update of `step`.

        Raises:
            NonFiniteError: Naming the first non-finite parameter, how many there are, and the step.
        """
        model = self._trainer.accelerator.unwrap_model(self._trainer.model)
        named = [(name, _local_tensor(p)) for name, p in model.named_parameters() if p.requires_grad]
        named = [(name, t) for name, t in named if t.numel()]
        bad = _nonfinite(named)
        if not _agreed(self._trainer, float(bool(bad))):
            return
        if not bad:
            raise NonFiniteError(
                f"Non-finite weights after the optimizer update of training step {step} on another process (see "
                "its error); training stopped."
            )
        name, tensor = bad[0]
        more = f" and {len(bad) - 1} more of the {len(named)} trainable tensors" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"Non-finite weights after the optimizer update of training step {step}: parameter {name!r} "
            f"({describe_nonfinite(tensor)}){more}. Training stopped before a checkpoint of them: every later step "
            "would be non-finite. Lower learning_rate, keep max_grad_norm > 0, or check for Inf gradients (fp16); "
            "resume from the last checkpoint."
        )


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    """What this process holds of `param`: its DTensor (FSDP2) shard, its ZeRO-3 partition, or the tensor."""
    if hasattr(param, "to_local"):
        return param.to_local()
    return getattr(param, "ds_tensor", param).detach()


def _nonfinite(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The `(name, tensor)` pairs holding a NaN or Inf, from one batched sum per device and one sync each."""
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append(index)
    suspects = []
    for indices in by_device.values():
        # A sum is non-finite when an element is (or, rarely, when finite values overflow: rescanned below).
        sums = torch.stack([torch.sum(named[i][1], dtype=torch.float32) for i in indices])
        if not bool(torch.isfinite(sums).all()):
            suspects += [indices[j] for j in torch.nonzero(~torch.isfinite(sums)).flatten().tolist()]
    return [named[i] for i in sorted(suspects) if not bool(torch.isfinite(named[i][1]).all())]


class PreemptionCallback(TrainerCallback):
    """On SIGTERM/SIGINT: finish the step, write a checkpoint, stop training, then raise `TrainingPreempted`.

    The handlers are installed when training begins and the previous ones put back when it ends; only in the main
    thread (Python runs signal handlers there), and a signal the process ignores (`SIG_IGN`, as a shell does for
    background jobs) stays ignored. The first signal only sets a flag: the step under way finishes (its rollout, loss,
    backward and optimizer update), then `on_step_end` asks the trainer to log, save and stop. A signal that arrives
    while a periodic checkpoint is written stops training right after it. With several processes the stop is agreed
    (a one-value gather per step), so a signal that reached only some of them stops all at the same step. A second
    signal goes to the previous handler at once (SIGTERM's default: the process ends; SIGINT's: `KeyboardInterrupt`),
    leaving the checkpoint being written unpublished (`checkpoints`), never half-written. If `train()` ended with an
    error (no `on_train_end`), the next signal finds no training under way, puts the previous handlers back and goes
    to them. A signal that comes after the last step is passed on to the previous handler when training ends.

    `TrainingPreempted` is raised from this callback's `on_train_end`: callbacks added after it (after the trainer was
    built) do not get `on_train_end` for a preempted run.

    Args:
        trainer: The trainer to stop.
        signals: The signals handled.
    """

    def __init__(self, trainer, signals: Sequence[int] = PREEMPTION_SIGNALS):
        self._trainer, self.signals = trainer, tuple(signals)
        self._previous: dict[int, object] = {}
        self.received: int | None = None  # the first signal of this run, in this process
        self._stop: tuple[int, int] | None = None  # (signal, step) once training is told to stop

    def on_train_begin(self, args, state, control, **kwargs):
        self._restore()  # handlers left by a `train()` that raised
        self.received, self._stop = None, None
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "Training runs outside the main thread: %s will not checkpoint and stop the run (Python handles "
                "signals in the main thread only).",
                "/".join(signal.Signals(s).name for s in self.signals),
            )
            return
        for number in self.signals:
            previous = signal.getsignal(number)
            if previous is signal.SIG_IGN or previous is None:
                # Ignored (as a shell does for background jobs: kept so), or a handler set outside Python, which
                # could not be put back afterwards.
                ignored = previous is signal.SIG_IGN
                logger.log(
                    logging.INFO if ignored else logging.WARNING,
                    "%s is %s in this process: left as it is, so it will not checkpoint and stop the run.",
                    signal.Signals(number).name,
                    "ignored" if ignored else "handled outside Python",
                )
                continue
            self._previous[number] = previous
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if not self._training_under_way(frame):
            self._restore()
            _forward(number, frame, self._previous_of(number))
            return
        if self.received is not None:
            logger.warning("Second signal (%s): exiting now; the checkpoint being written, if any, is dropped.", name)
            previous = self._previous_of(number)
            self._restore()
            _forward(number, frame, previous)
            return
        self.received = number
        logger.warning(
            "%s received: finishing training step %d, then saving a checkpoint and stopping (send it again to exit "
            "at once, without that checkpoint).",
            name,
            self._trainer.state.global_step + 1,
        )

    def _training_under_way(self, frame) -> bool:
        """Whether the interrupted code runs inside this trainer's `train()` (it does not once `train()` raised)."""
        while frame is not None:
            if frame.f_code.co_name == "train" and frame.f_locals.get("self") is self._trainer:
                return True
            frame = frame.f_back
        return False

    def _previous_of(self, number: int):
        return self._previous.get(number, signal.getsignal(number))

    def _restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def _stop_requested(self) -> int:
        """The signal number that some process received (0: none), agreed over the processes."""
        if not self.signals:  # the same on every process: none gathers
            return 0
        return int(_agreed(self._trainer, float(self.received or 0)))

    def on_step_end(self, args, state, control, **kwargs):
        number = self._stop_requested()
        if number and self._stop is None:
            self._stop = (number, state.global_step)
            control.should_log = control.should_save = control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        number = self._stop_requested()
        if number and self._stop is None:  # the signal came while this periodic checkpoint was written
            self._stop = (number, state.global_step)
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        previous = dict(self._previous)
        self._restore()
        if self._stop is None:
            if self.received is not None:  # after the last step: training is complete, the signal is not dropped
                logger.warning("%s came after the last step; passing it on.", signal.Signals(self.received).name)
                _forward(self.received, None, previous.get(self.received, signal.SIG_DFL))
            return
        number, step = self._stop
        checkpoint = os.path.join(self._trainer._get_output_dir(trial=None), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        preempted = TrainingPreempted(number, step, checkpoint)
        logger.warning("%s", preempted)
        raise preempted


def _forward(number: int, frame, previous) -> None:
    """Deliver signal `number` as the handler `previous` would have: call it, or apply the default action."""
    if callable(previous):
        previous(number, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(number, signal.SIG_DFL)
        signal.raise_signal(number)
