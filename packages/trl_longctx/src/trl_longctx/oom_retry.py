"""Out-of-memory retry of a training step: what is lowered, by how much, what is said, and how a failed try is undone.

A step that runs out of memory in the log-prob or recompute path (decoder forward, fused lm_head + log-softmax, their
backward) is retried once with half the decoder mini batch and at most half the logit chunk; the lowered values stay
for the rest of the run. `LongContextGRPOTrainer.training_step` drives it (`retry_on_oom`, single-process runs).

What a failed try leaves behind is undone before the retry: the gradients it accumulated (a retried step must not count
them twice; those of earlier accumulation micro-steps are kept), the metrics it logged, and, on CUDA, the allocator's
cached blocks. The retry reuses the batch the failed try prepared, so it scores the same completions.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from longctx_kernels import default_chunk_size

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


def retry_supported(accelerator) -> bool:
    """Whether a step can be retried in place: one process, no DeepSpeed/FSDP gradient management.

    With several processes the others would wait for the failed one in a collective (DDP's all-reduce, FSDP's
    all-gather), and a retry would pair its collectives with theirs in the wrong order.
    """
    return accelerator.num_processes == 1 and accelerator.distributed_type == DistributedType.NO


@dataclass(frozen=True)
class ChunkSizes:
    """The sizes the log-prob path allocates by.

    Attributes:
        mini_batch: Sequences per decoder pass (`grpo_mini_batch`, resolved against the per-device batch).
        logit_chunk_multiplier: `logit_chunk_multiplier` as configured (`None`: the 256 MiB default chunk).
        logit_chunk_rows: Rows of float32 logits `[rows, vocab]` in one lm_head chunk, at `max_completion_length`.
    """

    mini_batch: int
    logit_chunk_multiplier: int | None
    logit_chunk_rows: int

    def describe(self) -> str:
        return (
            f"grpo_mini_batch={self.mini_batch}, logit_chunk_multiplier={self.logit_chunk_multiplier} "
            f"(logit chunk {self.logit_chunk_rows} rows)"
        )


def logit_chunk_rows(mini_batch: int, multiplier: int | None, completion_length: int, vocab_size: int) -> int:
    """Rows of one logit chunk, as `LongContextGRPOTrainer._logit_chunk_size` picks it, capped by the mini batch's
    tokens (a chunk never spans two mini batches)."""
    tokens = mini_batch * completion_length
    if multiplier is None:
        return min(default_chunk_size(vocab_size), tokens)
    return min(mini_batch * math.ceil(completion_length / multiplier), tokens)


def current_chunk_sizes(args, vocab_size: int) -> ChunkSizes:
    """The chunk sizes a training step runs with under `args` (a `LongContextGRPOConfig`).

    TRL hands the log-prob path `per_device_train_batch_size` sequences at a time (loss and scoring alike), so a larger
    `grpo_mini_batch` acts as that batch. Rows are counted at `max_completion_length`, the longest a step can see.
    """
    batch = args.per_device_train_batch_size
    mini_batch = min(args.grpo_mini_batch or batch, batch)
    multiplier = args.logit_chunk_multiplier
    rows = logit_chunk_rows(mini_batch, multiplier, args.max_completion_length, vocab_size)
    return ChunkSizes(mini_batch, multiplier, rows)


def lowered_chunk_sizes(current: ChunkSizes, completion_length: int, vocab_size: int) -> ChunkSizes | None:
    """Half the mini batch and at most half the logit chunk; `None` when both are at one already.

    The logit chunk is `mini_batch * ceil(completion_length / multiplier)` rows, so halving the mini batch halves it;
    the multiplier grows only where that is not enough (a mini batch of one, or a `None` multiplier whose budget chunk
    does not depend on the mini batch), to the smallest value whose chunk is at most half the old one.
    """
    target_rows = max(1, current.logit_chunk_rows // 2)
    mini_batch = max(1, min(current.mini_batch // 2, target_rows))
    rows_per_sequence = target_rows // mini_batch  # >= 1, as mini_batch <= target_rows
    needed = math.ceil(completion_length / rows_per_sequence)  # smallest m with ceil(L / m) <= rows_per_sequence
    multiplier = max(needed, current.logit_chunk_multiplier or 1)  # never below the configured one
    lowered = ChunkSizes(
        mini_batch, multiplier, logit_chunk_rows(mini_batch, multiplier, completion_length, vocab_size)
    )
    if (lowered.mini_batch, lowered.logit_chunk_rows) == (current.mini_batch, current.logit_chunk_rows):
        return None
    return lowered


def apply_chunk_sizes(args, sizes: ChunkSizes) -> None:
    """Set `grpo_mini_batch` and `logit_chunk_multiplier` of `args` for the rest of the run."""
    args.grpo_mini_batch = sizes.mini_batch
    args.logit_chunk_multiplier = sizes.logit_chunk_multiplier


def first_line(error: BaseException, limit: int = 200) -> str:
    """`TypeName: first line of the message`, shortened, for a log line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def lowering_message(step: int, error: str, tried: ChunkSizes, lowered: ChunkSizes, completion_length: int) -> str:
    """The warning logged before the retry: the step, the error, and the old and new values."""
    return (
        f"Out of memory at training step {step} ({error}). Lowering the chunk sizes for the rest of the run: "
        f"grpo_mini_batch {tried.mini_batch} -> {lowered.mini_batch}, logit_chunk_multiplier "
        f"{tried.logit_chunk_multiplier} -> {lowered.logit_chunk_multiplier} (logit chunk {tried.logit_chunk_rows} -> "
        f"{lowered.logit_chunk_rows} rows at max_completion_length={completion_length}); retrying the step once."
    )


def failure_message(step: int, error: str, tried: list[ChunkSizes]) -> str:
    """The message of the `OutOfMemoryRetryError` that ends the run: the step and every set of values tried."""
    attempts = "; then ".join(sizes.describe() for sizes in tried)
    why = "again after lowering the chunk sizes" if len(tried) > 1 else "with nothing left to lower"
    return (
        f"Out of memory at training step {step} {why} ({error}). Tried: {attempts}. Lower per_device_train_batch_size "
        "or max_completion_length, turn on gradient_checkpointing, or leave more memory to training (e.g. a lower "
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
