"""SIGTERM a training process mid-step: it finishes the step, checkpoints, exits 143; the resumed run matches an
uninterrupted one step by step. A second signal while the checkpoint is written exits at once, leaving no partial
checkpoint. The handlers are the previous ones again once `train()` is over, even when it raised."""

import json
import logging
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_atomic_checkpoints import CHECKPOINT_FILES, checkpoint_names
from test_longctx_grpo_trainer import make_trainer
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from trl_longctx.fault_callbacks import NonFiniteStopCallback, PreemptionCallback, TrainingPreempted

# Logged values that depend on the weights, the data order and the sampling RNG; timings are left out.
COMPARED = ("reward", "loss", "entropy", "completions/mean_length", "grad_norm", "learning_rate")
MAX_STEPS, SIGNAL_AT_STEP = 5, 3

# One training process. argv: model dir, run dir, "fresh" | "resume", the step during which it waits for the test to
# signal (0: none), and "wait-in-save" to wait for a second signal while that step's checkpoint is written.
CHILD = r"""
import sys, time
from pathlib import Path

from transformers import AutoModelForCausalLM
from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
from trl_longctx.metrics_callback import RunFilesCallback
from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset

model_dir, run_dir, mode, wait_at = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
wait_in_save = "wait-in-save" in sys.argv


def wait_for(name, what):
    print(what, flush=True)  # the test signals, then creates `name`
    deadline = time.monotonic() + 120
    while not (run_dir / name).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def reward(prompts, completions, target, **kwargs):
    # Mid-step: the rollout is done; the loss, backward and optimizer update of the step are not.
    if trainer.state.global_step + 1 == wait_at and not (run_dir / "signal-1").exists():
        wait_for("signal-1", f"IN STEP {wait_at}")
    return copy_letter_reward(prompts, completions, target)


settings = dict(
    output_dir=str(run_dir), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
    max_steps=int(sys.argv[5]), learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none",
    use_cpu=True, bf16=False, disable_tqdm=True, seed=0,
)
trainer = LongContextGRPOTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward,
    args=LongContextGRPOConfig(**settings), train_dataset=make_copy_letter_dataset(64),
)
trainer.add_callback(RunFilesCallback(run_dir))  # as `longctx-grpo train` adds it, after the trainer is built
if wait_in_save:
    save_rng_state = trainer._save_rng_state

    def waiting_save_rng_state(output_dir):
        wait_for("signal-2", "SAVING")  # the weights and optimizer are written, the RNG state and publish are not
        save_rng_state(output_dir)

    trainer._save_rng_state = waiting_save_rng_state
trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
print("TRAIN RETURNED", flush=True)
"""


def start(model_dir, run_dir, mode="fresh", wait_at=0, *extra):
    run_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = run_dir.parent / f"{run_dir.name}-{mode}.stderr"
    with open(stderr_path, "w") as stderr:  # a file, not a pipe: the child logs much and is read only by line
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, model_dir, str(run_dir), mode, str(wait_at), str(MAX_STEPS), *extra],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    process.stderr_path = stderr_path
    return process


def wait_for_line(process, text, timeout=300):
    deadline = time.monotonic() + timeout
    for line in process.stdout:  # blocks per line; the child prints few
        if line.strip() == text:
            return
        assert time.monotonic() < deadline, f"no {text!r} from the child"
    raise AssertionError(f"the child exited (rc {process.wait()}) before printing {text!r}: " + log_of(process))


def signal_and_confirm(process, run_dir, marker):
    process.send_signal(signal.SIGTERM)  # a real signal, from another process
    (run_dir / marker).touch()


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def log_of(process):
    return process.stderr_path.read_text()[-4000:]


def records(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def run_to_end(model_dir, run_dir, mode="fresh"):
    process = start(model_dir, run_dir, mode)
    rc, out = finish(process)
    assert rc == 0, log_of(process)
    assert "TRAIN RETURNED" in out
    return process


def test_sigterm_mid_step_checkpoints_exits_143_and_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    run_to_end(tiny_model_dir, tmp_path / "full")

    run_dir = tmp_path / "preempted"
    process = start(tiny_model_dir, run_dir, "fresh", SIGNAL_AT_STEP)
    wait_for_line(process, f"IN STEP {SIGNAL_AT_STEP}")
    signal_and_confirm(process, run_dir, "signal-1")
    rc, out = finish(process)
    log = log_of(process)
    assert rc == 128 + signal.SIGTERM, log  # 143: a stopped job, not a finished one
    assert "TRAIN RETURNED" not in out  # the caller's code after train() does not run
    assert f"SIGTERM received: finishing training step {SIGNAL_AT_STEP}, then saving a checkpoint" in log
    checkpoint = run_dir / f"checkpoint-{SIGNAL_AT_STEP}"
    assert f"Training stopped by SIGTERM after step {SIGNAL_AT_STEP}; checkpoint {checkpoint}" in log
    # The step under way was finished and checkpointed (save_strategy="no"), its metrics logged; nothing staged left.
    assert checkpoint_names(run_dir) == [checkpoint.name]
    assert {p.name for p in checkpoint.iterdir()} >= CHECKPOINT_FILES
    assert sorted(records(run_dir)) == list(range(1, SIGNAL_AT_STEP + 1))
    assert not (run_dir / "summary.json").exists()  # the run is not over

    run_to_end(tiny_model_dir, run_dir, "resume")
    expected, actual = records(tmp_path / "full"), records(run_dir)
    assert sorted(actual) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):  # steps 1-3 logged by the preempted run, 4-5 by the resumed one
        for key in COMPARED:
            assert actual[step][key] == expected[step][key], (
                f"step {step} {key}: {actual[step][key]} != {expected[step][key]}"
            )
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == MAX_STEPS


def test_second_sigterm_while_saving_exits_at_once_without_a_partial_checkpoint(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = start(tiny_model_dir, run_dir, "fresh", SIGNAL_AT_STEP, "wait-in-save")
    wait_for_line(process, f"IN STEP {SIGNAL_AT_STEP}")
    signal_and_confirm(process, run_dir, "signal-1")
    wait_for_line(process, "SAVING")
    signal_and_confirm(process, run_dir, "signal-2")
    rc, _ = finish(process)
    log = log_of(process)
    assert rc == -signal.SIGTERM, log  # SIGTERM's default action: no cleanup, as a kill
    assert "Second signal (SIGTERM): exiting now" in log
    # The checkpoint being written stays staged, invisible to a resume (and removed by the next save).
    assert checkpoint_names(run_dir) == [f"_checkpoint-{SIGNAL_AT_STEP}.partial"]
    assert get_last_checkpoint(str(run_dir)) is None


def installed(trainer, kind):
    """The one callback of `kind` that the trainer's `__init__` added."""
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind)]
    return callback


def test_the_trainer_installs_the_fault_callbacks_once_and_last(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_consecutive_nonfinite=5)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names[-2:] == ["NonFiniteStopCallback", "PreemptionCallback"]
    assert installed(trainer, NonFiniteStopCallback).max_consecutive == 5  # the config's value


class Probe(TrainerCallback):
    """Records the signal handlers in place while a step runs."""

    def on_step_end(self, args, state, control, **kwargs):
        self.handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}


class Fail(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("a failure inside train()")


def test_handlers_are_restored_after_train_and_a_signal_after_a_failed_train_goes_to_the_previous_one(
    tiny_model_dir, tmp_path
):
    received = []
    previous_term = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job of a shell
    try:
        user_handler = signal.getsignal(signal.SIGTERM)
        trainer = make_trainer(tiny_model_dir, tmp_path)
        preemption = installed(trainer, PreemptionCallback)
        probe = Probe()
        trainer.add_callback(probe)
        trainer.train()
        assert probe.handlers == {signal.SIGTERM: preemption._handle, signal.SIGINT: signal.SIG_IGN}
        assert signal.getsignal(signal.SIGTERM) is user_handler  # put back at the end of train()

        trainer.add_callback(Fail())
        with pytest.raises(RuntimeError, match="a failure inside train"):
            trainer.train()  # no on_train_end: our handler is still installed
        assert signal.getsignal(signal.SIGTERM) == preemption._handle
        signal.raise_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [signal.SIGTERM]  # no training under way: delivered to the previous handler
        assert signal.getsignal(signal.SIGTERM) is user_handler
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def test_outside_the_main_thread_no_handler_is_installed_and_it_says_so(tiny_model_dir, tmp_path, caplog):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    preemption = PreemptionCallback(trainer)
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="trl_longctx.fault_callbacks"):
        thread = threading.Thread(target=preemption.on_train_begin, args=(trainer.args, trainer.state, None))
        thread.start()
        thread.join()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "outside the main thread: SIGTERM/SIGINT will not checkpoint and stop the run" in caplog.text


def test_training_preempted_is_a_system_exit_with_the_shell_code():
    error = TrainingPreempted(signal.SIGINT, 7, "runs/x/checkpoint-7")
    assert isinstance(error, SystemExit) and not isinstance(error, Exception)
    assert error.code == 130
    assert "resume_from_checkpoint='runs/x/checkpoint-7'" in str(error)


class SignalAfterLastCheck(TrainerCallback):
    """Sends SIGTERM at the end of the last step, after the preemption callback has looked at it."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            signal.raise_signal(signal.SIGTERM)


def test_a_signal_after_the_last_step_is_passed_on_not_dropped(tiny_model_dir, tmp_path):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=2)
        trainer.add_callback(SignalAfterLastCheck())
        trainer.train()  # complete: nothing is raised
        assert trainer.state.global_step == 2 and not list(tmp_path.glob("checkpoint-*"))
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
