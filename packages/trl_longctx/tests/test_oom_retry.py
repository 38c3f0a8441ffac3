"""Out-of-memory retry: a real allocation failure under a memory cap, a retry with lowered chunk sizes, exact gradients.

The trainer tests run in a child process (this file, run as a script) under `RLIMIT_DATA`, which caps the private
writable memory the process may map: torch's CPU allocator then fails the way it does when a machine runs out of memory
(`RuntimeError: ... DefaultCPUAllocator: can't allocate memory`). The model has a 131072-row vocabulary, so one chunk
of float32 logits of the whole micro-batch (`logit_chunk_multiplier=1`, 32 sequences x 32 tokens) is 512 MiB and its
forward holds two such buffers; halving the mini batch halves them. The caps sit between those working sets.
"""

import json
import re
import resource
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from testing_utils import assert_close

from trl_longctx import LongContextGRPOConfig
from trl_longctx.oom_retry import (
    ChunkSizes,
    OutOfMemoryRetryError,
    StepAttempt,
    is_out_of_memory,
    logit_chunk_rows,
    lowered_chunk_sizes,
)

TOLERANCES = {"loss": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-5, "rtol": 1e-3}}  # fp32 rows, STYLE.md
VOCAB, BATCH, COMPLETION = 131072, 32, 32
MIB = 2**20
# Caps, in MiB above the private memory mapped when they are set. Measured on a 2-core CPU (retry off), a micro-step
# needs a cap above 1050-1100 at 32 sequences and 600-640 at 16 when it is the first; above 560-600 at 16 and at most
# 300 at 8 when it is the second (the first one's gradients already held). The caps sit mid-way: in the first
# micro-step 16 fits and 32 does not, in the second 8 fits and 16 does not. "twice": nothing fits.
CAP_FIRST_MIB, CAP_SECOND_MIB, CAP_TIGHT_MIB = 850, 430, 120


# ---------------------------------------------------------------------------------------------------------------------
# The policy: what is lowered and by how much.


@pytest.mark.parametrize(
    "current, length, vocab, expected",
    [
        # logit_chunk_multiplier=1: halving the mini batch halves the chunk; the multiplier stays.
        (ChunkSizes(32, 1, 1024), 32, VOCAB, ChunkSizes(16, 1, 512)),
        # A set multiplier is never lowered.
        (ChunkSizes(8, 4, 64), 32, 48, ChunkSizes(4, 4, 32)),
        # Mini batch of one: only the multiplier can halve the chunk.
        (ChunkSizes(1, 1, 32), 32, 48, ChunkSizes(1, 2, 16)),
        # None (256 MiB budget chunk: 512 rows at V=131072) becomes the multiplier that halves it at the longest
        # completion: 16 sequences x ceil(32 / 2) = 256 rows.
        (ChunkSizes(32, None, 512), 32, VOCAB, ChunkSizes(16, 2, 256)),
        # None with a budget larger than the mini batch's tokens: the chunk was all of them; half of them now.
        (ChunkSizes(8, None, 64), 8, 48, ChunkSizes(4, 1, 32)),
        # Odd sizes (47 sequences, 7 tokens, multiplier 3: ceil(7/3) = 3 rows each = 141 rows): 23 x 3 = 69 <= 70.
        (ChunkSizes(47, 3, 141), 7, 123, ChunkSizes(23, 3, 69)),
        # Nothing left to lower: one sequence, one row.
        (ChunkSizes(1, 32, 1), 32, 48, None),
    ],
)
def test_lowered_chunk_sizes(current, length, vocab, expected):
    assert current.logit_chunk_rows == logit_chunk_rows(
        current.mini_batch, current.logit_chunk_multiplier, length, vocab
    )
    lowered = lowered_chunk_sizes(current, length, vocab)
    assert lowered == expected
    if lowered is not None:
        assert lowered.mini_batch <= max(1, current.mini_batch // 2)
        assert lowered.logit_chunk_rows <= max(1, current.logit_chunk_rows // 2)


def test_trainer_chunk_follows_the_one_rule():
    """The trainer's chunk is `logit_chunk_rows`: the 256 MiB default or `mini_batch * ceil(L / multiplier)` rows,
    capped at the mini batch's tokens (explicit values, so a change of the rule shows here)."""
    from longctx_kernels import default_chunk_size
    from trl_longctx import LongContextGRPOTrainer

    cases = [  # (multiplier, mini_batch, completion length, vocab, expected rows)
        (None, 8, 1000, 151_936, default_chunk_size(151_936)),
        (None, 1, 5, 48, 5),  # the default chunk is larger than the 5 tokens there are
        (1, 4, 7, 48, 28),
        (3, 4, 7, 48, 12),  # 4 * ceil(7 / 3)
        (64, 8, 1000, 151_936, 128),  # 8 * ceil(1000 / 64)
    ]
    for multiplier, mini_batch, length, vocab, expected in cases:
        trainer = SimpleNamespace(args=SimpleNamespace(logit_chunk_multiplier=multiplier))
        assert LongContextGRPOTrainer._logit_chunk_size(trainer, mini_batch, length, vocab) == expected
        assert logit_chunk_rows(mini_batch, multiplier, length, vocab) == expected


def test_real_allocation_failures_are_recognized():
    with pytest.raises(RuntimeError) as failure:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: the allocator really fails (ENOMEM), no cap needed
    assert is_out_of_memory(failure.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(OutOfMemoryRetryError("again"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(MemoryError())


def test_config_refuses_a_non_bool(tmp_path):
    assert LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True).retry_on_oom is True
    with pytest.raises(ValueError, match="retry_on_oom must be True or False, got 'yes'"):
        LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True, retry_on_oom="yes")


# ---------------------------------------------------------------------------------------------------------------------
# Undoing a failed try: a partial backward leaves no gradient behind, earlier micro-steps' gradients stay.


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward allocates `nbytes` (1 PiB: a real allocator failure) before passing the gradient on."""

    @staticmethod
    def forward(ctx, x, nbytes):
        ctx.nbytes = nbytes
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        workspace = torch.empty(ctx.nbytes, dtype=torch.uint8)
        del workspace
        return grad, None


def _toy_step(a, b, nbytes):
    # `b`'s node is created first, so the engine runs `a`'s branch (later sequence number) and accumulates `a.grad`
    # before `b`'s backward fails: a partial backward.
    y_b = _FailingBackward.apply(b, nbytes).pow(2).sum()
    y_a = (a * torch.arange(1.0, 4.0)).sum()
    (y_a + y_b).backward()


def test_the_toy_backward_fails_half_way():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        _toy_step(a, b, 2**50)
    assert a.grad is not None and b.grad is None  # what the next test's failed try leaves without StepAttempt


def test_failed_try_keeps_earlier_gradients_and_drops_its_partial_ones():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((3,), 2.0))
    model = torch.nn.ParameterList([a, b])
    trainer = SimpleNamespace(
        _metrics={"train": defaultdict(list, loss=[0.5])},
        state=SimpleNamespace(num_input_tokens_seen=100),
        _step_attempt=None,
    )
    _toy_step(a, b, 1)  # an earlier micro-step
    earlier = {"a": a.grad.clone(), "b": b.grad.clone()}
    grad_objects = (a.grad, b.grad)

    with pytest.raises(RuntimeError) as failure, StepAttempt(trainer, model) as attempt:
        assert trainer._step_attempt is attempt and a.grad is None and b.grad is None
        trainer._metrics["train"]["loss"].append(9.0)
        trainer._metrics["train"]["new_metric"].append(1.0)
        trainer.state.num_input_tokens_seen += 50
        _toy_step(a, b, 2**50)
    assert is_out_of_memory(failure.value)
    assert trainer._step_attempt is None
    assert a.grad is grad_objects[0] and b.grad is grad_objects[1]  # the partial `a` gradient was dropped
    assert torch.equal(a.grad, earlier["a"]) and torch.equal(b.grad, earlier["b"])
    assert dict(trainer._metrics["train"]) == {"loss": [0.5]}
    assert trainer.state.num_input_tokens_seen == 100  # no batch was prepared: the retry rolls out again

    with StepAttempt(trainer, model):
        _toy_step(a, b, 1)
    assert torch.equal(a.grad, 2 * earlier["a"]) and torch.equal(b.grad, 2 * earlier["b"])
    assert a.grad is grad_objects[0]  # accumulated in place, as autograd does


def test_undo_after_the_batch_was_prepared_keeps_rollout_metrics():
    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(
        _metrics={"train": defaultdict(list)}, state=SimpleNamespace(num_input_tokens_seen=0), _step_attempt=None
    )
    with pytest.raises(RuntimeError), StepAttempt(trainer, model) as attempt:
        trainer.state.num_input_tokens_seen = 40
        trainer._metrics["train"]["reward"].append(0.25)
        attempt.prepared({"completion_ids": torch.zeros(1)})
        trainer._metrics["train"]["entropy"].append(3.0)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    assert dict(trainer._metrics["train"]) == {"reward": [0.25]}
    assert trainer.state.num_input_tokens_seen == 40
    assert set(attempt.batch) == {"completion_ids"}


# ---------------------------------------------------------------------------------------------------------------------
# The trainer under a real memory cap (child process).


@pytest.fixture(scope="module")
def capped_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("oom")
    child = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    results["grads"] = {name: torch.load(out / f"grads_{name}.pt") for name in ("retried", "reference")}
    return results


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA caps mmaps on Linux only")
def test_step_completes_after_lowering_and_logs_the_values(capped_runs):
    retried = capped_runs["retried"]
    assert retried["global_step"] == 1
    warnings = retried["warnings"]
    assert len(warnings) == 2, warnings  # one per micro-step: 32 -> 16 in the first, 16 -> 8 in the second
    assert all("DefaultCPUAllocator: can't allocate memory" in w for w in warnings), warnings
    assert "Out of memory at training step 1" in warnings[0]
    assert "grpo_mini_batch 32 -> 16, logit_chunk_multiplier 1 -> 1 (logit chunk 1024 -> 512 rows" in warnings[0]
    assert "grpo_mini_batch 16 -> 8, logit_chunk_multiplier 1 -> 1 (logit chunk 512 -> 256 rows" in warnings[1]
    assert retried["chunk_sizes"] == {"grpo_mini_batch": 8, "logit_chunk_multiplier": 1}  # for the rest of the run
    assert retried["rollouts"] == 1  # the first micro-step's retry reused its batch: no second rollout


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA caps mmaps on Linux only")
def test_gradients_and_loss_equal_a_run_with_the_lowered_values(capped_runs):
    # The second micro-step ran out of memory with the first one's gradients accumulated: a retry that dropped them,
    # or kept a failed try's, would be off by a whole micro-step, not by rounding.
    retried, reference = capped_runs["retried"], capped_runs["reference"]
    assert reference["warnings"] == [] and reference["rollouts"] == 1
    for key in ("loss", "entropy"):
        assert_close(torch.tensor(retried[key]), torch.tensor(reference[key]), key, **TOLERANCES["loss"])
    grads, expected = capped_runs["grads"]["retried"], capped_runs["grads"]["reference"]
    assert grads.keys() == expected.keys() and len(grads) > 5
    norm = torch.cat([g.flatten() for g in expected.values()]).norm().item()
    assert norm > 0.05, f"gradient norm {norm:.3g}: too small for the comparison to mean anything"
    for name in expected:
        assert_close(grads[name], expected[name], f"grad of {name}", **TOLERANCES["grads"])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA caps mmaps on Linux only")
def test_second_failure_names_the_step_and_the_values_tried(capped_runs):
    twice = capped_runs["twice"]
    assert twice["error_type"] == "OutOfMemoryRetryError" and twice["is_torch_oom"]
    assert twice["cause"] == "RuntimeError"  # the allocator's error is chained
    message = twice["message"]
    assert "Out of memory at training step 1 again after lowering the chunk sizes" in message
    assert "grpo_mini_batch=32, logit_chunk_multiplier=1 (logit chunk 1024 rows)" in message
    assert "then grpo_mini_batch=16, logit_chunk_multiplier=1 (logit chunk 512 rows)" in message
    assert twice["grads_left"] == 0  # the failed tries left no gradient behind


# ---------------------------------------------------------------------------------------------------------------------
# Child process.


def _private_memory() -> int:
    """Bytes of private writable memory mapped by this process: what RLIMIT_DATA limits (Linux >= 4.7)."""
    with open("/proc/self/status") as status:
        return int(re.search(r"VmData:\s+(\d+) kB", status.read()).group(1)) * 1024


def _set_cap(margin_mib: int | None) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = hard if margin_mib is None else _private_memory() + margin_mib * MIB
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _child(out_dir: str) -> None:
    import logging
    from pathlib import Path

    from transformers import TrainerCallback

    from trl_longctx import LongContextGRPOTrainer
    from trl_longctx.tasks import make_copy_letter_dataset
    from trl_longctx.tiny_models import build_char_tokenizer, build_tiny_qwen3

    out = Path(out_dir)
    tokenizer = build_char_tokenizer()
    # One small layer and a big vocabulary: the logit chunk is nearly all of the step's memory. Token ids past the
    # tokenizer's 48 decode to nothing; the reward reads the ids.
    model = build_tiny_qwen3(VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                             head_dim=64, intermediate_size=128, tokenizer=tokenizer)  # fmt: skip
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")

    def ids_reward(completion_ids, **kwargs):
        return [(sum(ids) % 7) / 7 for ids in completion_ids]

    class Counting(LongContextGRPOTrainer):
        rollouts = 0

        def _generate_and_score_completions(self, inputs):
            type(self).rollouts += 1
            return super()._generate_and_score_completions(inputs)

    class Caps(TrainerCallback):
        """Cap memory from the step's start (`first`), tighter after its first micro-step (`second`); capture grads."""

        def __init__(self, first, second, grads_path):
            self.first, self.second, self.grads_path = first, second, grads_path

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first is not None:
                _set_cap(self.first)

        def on_substep_end(self, args, state, control, **kwargs):
            if self.second is not None:
                _set_cap(self.second)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            _set_cap(None)
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save(grads, self.grads_path)

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("trl_longctx.longctx_grpo_trainer").addHandler(handler)

    def run(name, caps, steps, **overrides):
        warnings.clear()
        Counting.rollouts = 0
        settings = {
            "output_dir": str(out / name),
            "per_device_train_batch_size": BATCH,
            "num_generations": 8,
            "max_completion_length": COMPLETION,
            "gradient_accumulation_steps": steps,
            "max_steps": 1,
            "optim": "sgd",  # no optimizer state: the step's memory is the log-prob path's
            "learning_rate": 1e-2,
            "max_grad_norm": 0.0,  # the captured gradients are the raw ones
            "beta": 0.0,
            "logit_chunk_multiplier": 1,
            "bf16": False,
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1,
            "disable_tqdm": True,
        }
        trainer = Counting(
            model=str(out / "model"),
            reward_funcs=ids_reward,
            args=LongContextGRPOConfig(**{**settings, **overrides}),
            train_dataset=make_copy_letter_dataset(64),
        )
        trainer.add_callback(Caps(*caps, out / f"grads_{name}.pt"))
        result = {"rollouts": 0}
        try:
            trainer.train()
        except OutOfMemoryRetryError as error:
            result.update(
                error_type=type(error).__name__,
                is_torch_oom=isinstance(error, torch.OutOfMemoryError),
                cause=type(error.__cause__).__name__,
                message=str(error),
                grads_left=sum(p.grad is not None for p in trainer.model.parameters()),
            )
        finally:
            _set_cap(None)
        log = trainer.state.log_history[0] if trainer.state.log_history else {}
        result.update(
            rollouts=Counting.rollouts,
            warnings=[w for w in warnings if "Out of memory" in w],
            global_step=trainer.state.global_step,
            loss=log.get("loss"),
            entropy=log.get("entropy"),
            chunk_sizes={k: getattr(trainer.args, k) for k in ("grpo_mini_batch", "logit_chunk_multiplier")},
        )
        return result

    results = {
        "retried": run("retried", (CAP_FIRST_MIB, CAP_SECOND_MIB), steps=2),
        "reference": run("reference", (None, None), steps=2, grpo_mini_batch=8),
        # Greedy (no sampling over 131072 tokens: faster); its gradients are not compared.
        "twice": run("twice", (CAP_TIGHT_MIB, None), steps=1, generation_kwargs={"do_sample": False}),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    _child(sys.argv[1])
