"""Out-of-memory retry of a training step: what is lowered, by how much, what is said, and how a failed try is undone.

A step that runs out of memory in the log-prob or recompute path (decoder forward, fused lm_head + log-softmax, their
backward) is retried once with what that pass really ran with lowered (`trl_longctx.logprob_pass.lowered_sizes`: half
the decoder mini batch and half the logit chunk, more MLP tiles at a mini batch of one); the lowered sizes cap every
later pass of the run and the planner's choices are made again. `LongContextGRPOTrainer.training_step` drives it
(`retry_on_oom`, single-process runs).

What a failed try leaves behind is undone before the retry: the gradients it accumulated (a retried step must not count
them twice; those of earlier accumulation micro-steps are kept), the metrics it logged, and, on CUDA, the allocator's
cached blocks. The retry reuses the batch the failed try prepared, so it scores the same completions.
"""

from __future__ import annotations

import gc

import torch
from accelerate.utils import DistributedType

from .memory.planner import ChunkSizes

# What torch 2.13 raises when an allocation fails. CUDA (and XPU, MPS): `torch.OutOfMemoryError` (c10's
# OutOfMemoryError, "CUDA out of memory. Tried to allocate ..."), kept by the autograd engine when it happens in a
# backward. CPU: a plain `RuntimeError` from an enforce in `c10/core/impl/alloc_cpu.cpp`: "[enforce fail at
# alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes. Error code 12
# (Cannot allocate memory)"; older builds and Windows say "not enough memory".
CPU_ALLOCATOR_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


class OutOfMemoryRetryError(torch.OutOfMemoryError):
    """A training step ran out of memory again after its chunk sizes were lowered (or nothing was left to lower).

    A `torch.OutOfMemoryError`, so code that handles running out of memory handles it too.
    """


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch failing to allocate memory, on CUDA (`torch.OutOfMemoryError`) or on CPU."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(failure in str(error) for failure in CPU_ALLOCATOR_FAILURES)


def retry_unsupported_reason(accelerator) -> str | None:
    """Why a step cannot be retried in place in this run, or `None` when it can (one process, no DeepSpeed/FSDP).

    With several processes the others would wait for the failed one in a collective (DDP's all-reduce, FSDP's
    all-gather), and a retry would pair its collectives with theirs in the wrong order. DeepSpeed and FSDP keep
    gradient and parameter state of their own that a failed try leaves half-updated. One process under DDP (e.g.
    `torchrun --nproc_per_node 1`, or `RANK`/`WORLD_SIZE` set) has no peer to wait for: it is retried.
    """
    if accelerator.num_processes != 1:
        return f"{accelerator.num_processes} processes (a retry would desynchronize their collectives)"
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return f"{accelerator.distributed_type.value} manages the gradients (a failed try cannot be undone here)"
    return None


def retry_supported(accelerator) -> bool:
    """Whether a step can be retried in place (`retry_unsupported_reason` is `None`)."""
    return retry_unsupported_reason(accelerator) is None


def first_line(error: BaseException, limit: int = 200) -> str:
    """`TypeName: first line of the message`, shortened, for a log line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def lowering_message(step: int, error: str, used: ChunkSizes, lowered: ChunkSizes) -> str:
    """The warning logged before the retry: the step, the error, what the failed try ran with and what now."""
    return (
        f"Out of memory at training step {step} ({error}). The failed try's log-prob pass ran with {used.describe()}; "
        f"lowered for the rest of the run to {lowered.describe()}; retrying the step once."
    )


def failure_message(step: int, error: str, tried: list[ChunkSizes]) -> str:
    """The message of the `OutOfMemoryRetryError` that ends the run: the step and every set of sizes tried."""
    if not tried:
        where = "outside the log-prob pass (in the rollout, scoring or the optimizer), where the retry has nothing to lower"
        attempts = ""
    else:
        where = "again after lowering the chunk sizes" if len(tried) > 1 else "with nothing left to lower"
        attempts = " Tried: " + "; then ".join(sizes.describe() for sizes in tried) + "."
    return (
        f"Out of memory at training step {step} {where} ({error}).{attempts} Lower per_device_train_batch_size or "
        "max_completion_length, turn on gradient_checkpointing, or leave more memory to training (e.g. a lower "
        "vllm_gpu_memory_utilization); retry_on_oom=False turns this retry off."
    )


def free_memory(device: torch.device) -> None:
    """Return what a failed try held: collect its reference cycles, then (CUDA) the allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class StepAttempt:
    """One try of a training step of `trainer`; as a context manager, undone if it raises and kept if it does not.

    Gradients accumulated by earlier micro-steps are moved aside on entry (references, no copy), so the try accumulates
    into fresh `.grad`s. If the try raises, its gradients, partial or whole, are dropped and the earlier ones put back;
    otherwise its gradients are added to the earlier ones, the `old + new` that autograd's own accumulation computes.
    The metrics the try logged are removed too. While the try runs it is `trainer._step_attempt`, which
    `_prepare_inputs` tells about the batch it prepared (or asks for the batch to reuse).

    Args:
        trainer: The `LongContextGRPOTrainer` (its `model`, `_metrics["train"]` and `state` are used).
        model: The model the step trains (as `training_step` receives it).
        batch: The prepared batch to reuse (the retry of a try that got that far), else `None`.
    """

    def __init__(self, trainer, model: torch.nn.Module, batch=None):
        self._trainer = trainer
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        self._metrics = trainer._metrics["train"]
        self._earlier: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._lengths: dict[str, int] = {}
        self._tokens_seen = 0
        self.batch = batch

    def __enter__(self) -> StepAttempt:
        self._earlier = {p: p.grad for p in self._parameters if p.grad is not None}
        for p in self._earlier:
            p.grad = None
        self._lengths = {key: len(values) for key, values in self._metrics.items()}
        self._tokens_seen = self._trainer.state.num_input_tokens_seen
        self._trainer._step_attempt = self
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self._trainer._step_attempt = None
        if error_type is None:
            self._keep()
        else:
            self._undo()

    def prepared(self, batch) -> None:
        """Record the batch the try prepared (its rollout done): a retry reuses it and keeps its rollout metrics."""
        self.batch = batch
        self._lengths = {key: len(values) for key, values in self._metrics.items()}

    def _keep(self) -> None:
        for p, earlier in self._earlier.items():
            if p.grad is not None:
                earlier.add_(p.grad)
            p.grad = earlier

    def _undo(self) -> None:
        for p in self._parameters:
            p.grad = None
        for p, earlier in self._earlier.items():
            p.grad = earlier
        for key in list(self._metrics):
            kept = self._lengths.get(key, 0)
            if kept == 0:
                del self._metrics[key]  # TRL averages every list it logs: an empty one would divide by zero
            else:
                del self._metrics[key][kept:]
        if self.batch is None:  # the retry rolls out again and counts its tokens again
            self._trainer.state.num_input_tokens_seen = self._tokens_seen
