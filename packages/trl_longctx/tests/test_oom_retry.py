"""Out-of-memory retry: a real allocation failure under a memory cap, a retry with lowered chunk sizes, exact gradients.

The trainer tests run in a child process (this file, run as a script) under `RLIMIT_DATA`, which caps the private
writable memory the process may map: torch's CPU allocator then fails the way it does when a machine runs out of memory
(`RuntimeError: ... DefaultCPUAllocator: can't allocate memory`). The model has a 131072-row vocabulary, so one chunk
of float32 logits of the whole micro-batch (`logit_chunk_multiplier=1`, 32 sequences x 32 tokens) is 512 MiB and its
forward holds two such buffers; halving the mini batch halves them. The caps sit between those working sets.
"""

import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from testing_utils import assert_close, free_port

from trl_longctx import LongContextGRPOConfig, oom_retry
from trl_longctx.logprob_pass import LogProbPass, lowered_sizes
from trl_longctx.memory.planner import ChunkSizes
from trl_longctx.oom_retry import OutOfMemoryRetryError, StepAttempt, is_out_of_memory

TOLERANCES = {"loss": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-5, "rtol": 1e-3}}  # fp32 rows, STYLE.md
VOCAB, BATCH, COMPLETION = 131072, 32, 32
MIB = 2**20
# Caps, in MiB above the private memory mapped when they are set. Measured on a 2-core CPU (retry off), a micro-step
# needs a cap above 1050-1100 at 32 sequences and 600-640 at 16 when it is the first; above 560-600 at 16 and at most
# 300 at 8 when it is the second (the first one's gradients already held). The caps sit mid-way: in the first
# micro-step 16 fits and 32 does not, in the second 8 fits and 16 does not. "twice": nothing fits.
CAP_FIRST_MIB, CAP_SECOND_MIB, CAP_TIGHT_MIB = 850, 430, 120


# ---------------------------------------------------------------------------------------------------------------------
# The policy: what is lowered and by how much, and the one rule the sizes of a pass follow.


@pytest.mark.parametrize(
    "used, tokens, expected",
    [
        # Half the mini batch and half the logit chunk.
        (ChunkSizes(32, 1024, 1), 64, ChunkSizes(16, 512, 1)),
        # Odd sizes round down, never below one.
        (ChunkSizes(47, 141, 1), 7, ChunkSizes(23, 70, 1)),
        (ChunkSizes(1, 5, 1), 40_000, ChunkSizes(1, 2, 1)),
        # The Triton backend has no logit chunk: only the mini batch halves.
        (ChunkSizes(8, None, 1), 4096, ChunkSizes(4, None, 1)),
        # One sequence, one token per chunk: more MLP tiles (each of at least 8,192 tokens), then nothing.
        (ChunkSizes(1, 1, 1), 40_000, ChunkSizes(1, 1, 2)),
        (ChunkSizes(1, None, 2), 40_000, ChunkSizes(1, None, 3)),
        (ChunkSizes(1, None, 4), 40_000, None),
        (ChunkSizes(1, 1, 1), 64, None),
    ],
)
def test_lowered_sizes(used, tokens, expected):
    assert lowered_sizes(used, tokens) == expected


def _pass(tmp_path, **fields):
    args = LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True, **fields)
    return LogProbPass(args, torch.device("cpu"))


def test_sizes_follow_the_one_rule(tmp_path):
    """The logit chunk of the torch backend: the 256 MiB default or `mini_batch * ceil(L / multiplier)` tokens, capped
    at the mini batch's tokens; the retry's caps lower every later pass (explicit values, so a change shows here)."""
    from longctx_kernels import default_chunk_size

    config = SimpleNamespace()
    cases = [  # (multiplier, grpo_mini_batch, sequences, completion length, vocab, expected sizes)
        (None, None, 8, 1000, 151_936, ChunkSizes(8, default_chunk_size(151_936), 1)),
        (None, 1, 8, 5, 48, ChunkSizes(1, 5, 1)),  # the default chunk is larger than the 5 tokens there are
        (1, 4, 8, 7, 48, ChunkSizes(4, 28, 1)),
        (3, 4, 8, 7, 48, ChunkSizes(4, 12, 1)),  # 4 * ceil(7 / 3)
        (64, 8, 8, 1000, 151_936, ChunkSizes(8, 128, 1)),  # 8 * ceil(1000 / 64)
        (None, 16, 8, 10, 48, ChunkSizes(8, 80, 1)),  # never more sequences than the pass has
    ]
    for multiplier, mini_batch, sequences, length, vocab, expected in cases:
        passes = _pass(tmp_path, logit_chunk_multiplier=multiplier, grpo_mini_batch=mini_batch)
        assert passes.backend == "torch" and passes.free_bytes is None  # CPU: no planner unless a figure is given
        assert passes.sizes(config, vocab, sequences, length + 3, length) == expected
    passes = _pass(tmp_path, logit_chunk_multiplier=1, grpo_mini_batch=8)
    passes.begin_try()
    passes.used, passes._lengths = [ChunkSizes(8, 80, 1)], [13]
    assert passes.lower_after_oom() == ChunkSizes(4, 40, 1)
    assert passes.sizes(config, 48, 8, 13, 10) == ChunkSizes(4, 40, 1)  # capped for the rest of the run
    passes.begin_try()
    assert passes.lower_after_oom() is None  # no pass ran in this try: nothing the retry could lower


def test_a_logit_chunk_the_triton_backend_cannot_honour_is_refused(tmp_path):
    from trl_longctx.logprob_pass import resolved_backend

    args = LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True, logit_chunk_multiplier=4)
    assert resolved_backend(args, torch.device("cpu")) == "torch"
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: 'auto' is the torch backend everywhere")
    with pytest.raises(ValueError, match=r"logit_chunk_multiplier=4 sizes the torch backend's logit chunks.*Allowed"):
        resolved_backend(args, torch.device("cuda"))


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


ONE_PROCESS_DDP = r"""
import json, sys
from trl_longctx import oom_retry
from test_longctx_grpo_trainer import make_trainer
trainer = make_trainer(sys.argv[1], sys.argv[2])
accelerator = trainer.accelerator
print(json.dumps([accelerator.distributed_type.value, accelerator.num_processes, oom_retry.retry_supported(accelerator)]))
"""


def test_one_process_with_a_process_group_is_retried(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 1` (or RANK/WORLD_SIZE set, as a launcher does): Accelerate builds a process group
    and a DDP wrapper of one rank; no peer waits for the failed try, so the retry stays on."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    child = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS_DDP, tiny_model_dir, str(tmp_path)], env=env, cwd=Path(__file__).parent,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    kind, processes, supported = json.loads(child.stdout.strip().splitlines()[-1])
    assert (kind, processes, supported) == ("MULTI_CPU", 1, True)


@pytest.mark.parametrize(
    ("processes", "kind", "reason"),
    [
        (1, DistributedType.NO, None),
        (1, DistributedType.MULTI_GPU, None),
        (2, DistributedType.MULTI_GPU, "2 processes (a retry would desynchronize their collectives)"),
        (1, DistributedType.DEEPSPEED, "DEEPSPEED manages the gradients"),
        (1, DistributedType.FSDP, "FSDP manages the gradients"),
    ],
)
def test_why_a_retry_is_off_is_said(processes, kind, reason):
    accelerator = SimpleNamespace(num_processes=processes, distributed_type=kind)  # the two fields read
    found = oom_retry.retry_unsupported_reason(accelerator)
    assert found == reason if reason is None else found.startswith(reason)


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
    assert (
        "ran with grpo_mini_batch=32, logit chunk 1024 tokens, tiled_mlp_chunks=1; lowered for the rest of the run to "
        "grpo_mini_batch=16, logit chunk 512 tokens, tiled_mlp_chunks=1" in warnings[0]
    )
    assert "ran with grpo_mini_batch=16, logit chunk 512 tokens" in warnings[1]
    assert "to grpo_mini_batch=8, logit chunk 256 tokens" in warnings[1]
    # For the rest of the run: the pass's caps, the config as given.
    assert retried["sizes_after"] == [8, 256, 1]
    assert retried["chunk_sizes"] == {"grpo_mini_batch": None, "logit_chunk_multiplier": 1}
    assert retried["rollouts"] == 1  # the first micro-step's retry reused its batch: no second rollout
    # TRL's step_time counts the failed tries too (their rollout included), not only the retries: nearly all the
    # step's wall time, which adds only the optimizer step and callbacks.
    assert retried["step_time"] >= 0.9 * retried["step_wall"], (retried["step_time"], retried["step_wall"])


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
    assert "Tried: grpo_mini_batch=32, logit chunk 1024 tokens, tiled_mlp_chunks=1" in message
    assert "; then grpo_mini_batch=16, logit chunk 512 tokens, tiled_mlp_chunks=1." in message
    assert twice["grads_left"] == 0  # the failed tries left no gradient behind


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA caps mmaps on Linux only")
def test_the_retry_lowers_what_the_planner_chose(capped_runs):
    """With the planner sizing the pass (a free-memory figure on CPU, as on CUDA by default), the failed try ran the
    planner's sizes, and the retry ran half of them: not `per_device_train_batch_size`, not the same plan again."""
    planned = capped_runs["planned"]
    assert planned["error_type"] == "OutOfMemoryRetryError" and planned["grads_left"] == 0
    # 64 GiB free: all 32 sequences at once, the 256 MiB default chunk (512 tokens of a 131072-token vocabulary).
    assert (
        "Tried: grpo_mini_batch=32, logit chunk 512 tokens, tiled_mlp_chunks=1; then grpo_mini_batch=16, "
        in (planned["message"])
    )
    assert "logit chunk 256 tokens, tiled_mlp_chunks=1." in planned["message"]
    assert (
        len(planned["warnings"]) == 1
        and "lowered for the rest of the run to grpo_mini_batch=16" in (planned["warnings"][0])
    )


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
            self.began = time.perf_counter()
            if self.first is not None:
                _set_cap(self.first)

        def on_step_end(self, args, state, control, **kwargs):
            self.wall = time.perf_counter() - self.began

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

    def run(name, caps, steps, free_bytes=None, **overrides):
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
        if free_bytes is not None:  # the planner sizes the pass on CPU too, for this figure
            trainer.logprob_pass.free_bytes = lambda: free_bytes
        caps_callback = Caps(*caps, out / f"grads_{name}.pt")
        trainer.add_callback(caps_callback)
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
            step_time=log.get("step_time"),
            step_wall=getattr(caps_callback, "wall", None),
            chunk_sizes={k: getattr(trainer.args, k) for k in ("grpo_mini_batch", "logit_chunk_multiplier")},
            sizes_after=list(trainer.logprob_pass.sizes(trainer.model.config, VOCAB, BATCH, 40, COMPLETION)),
        )
        return result

    results = {
        "retried": run("retried", (CAP_FIRST_MIB, CAP_SECOND_MIB), steps=2),
        "reference": run("reference", (None, None), steps=2, grpo_mini_batch=8),
        # Greedy (no sampling over 131072 tokens: faster); its gradients are not compared.
        "twice": run("twice", (CAP_TIGHT_MIB, None), steps=1, generation_kwargs={"do_sample": False}),
        # The planner active (as on CUDA by default): it sizes the pass; the retry lowers what it chose.
        "planned": run(
            "planned",
            (CAP_TIGHT_MIB, None),
            steps=1,
            free_bytes=64 * 2**30,
            logit_chunk_multiplier=None,
            generation_kwargs={"do_sample": False},
        ),  # fmt: skip
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    _child(sys.argv[1])
