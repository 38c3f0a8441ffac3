"""How many sequences one GRPO step can take on a GPU at given lengths: the training step's and the colocated
rollout's limits, side by side, so the memory the fused path frees can go to larger batches.

The two sides take turns on the GPU (KV-only standby): the training step runs with vLLM holding only the shared
weights, the rollout with the trainer holding only its resident state. So each has its own limit:

- training: the most sequences per device batch (`per_device_train_batch_size`, the planner's `num_generations`)
  whose step fits the GPU with the smallest mini batch the planner may choose (the trainer picks the largest that
  fits) and the fewest MLP tiles, and whose offloaded checkpoints fit the pinnable host memory. This is the largest
  `n` for which `plan_memory` fits; more sequences per step then cost time (more mini batches), not memory.
- rollout: the most sequences vLLM decodes at once (`per_device_train_batch_size * steps_per_generation` per
  generation round; beyond it vLLM decodes in waves, each as long as the longest completion). Its KV cache gets what
  the GPU has after vLLM's weights (one copy, shared with the trainer), vLLM's other memory (`VLLM_OTHER_GIB`), the
  CUDA context and the trainer's LoRA parameters with their AdamW states.

Modeled where the weights are shared: LoRA and QLoRA on text models, LoRA on Mixture-of-Experts and vision-language
models (the vision tower's weights counted; vLLM's encoder cache and the tower's activations while it encodes a
rollout's images are bounded by vLLM's batched-token budget and left to `VLLM_OTHER_GIB`). Full fine-tuning (vLLM
keeps its own copy) and 4-bit Mixture-of-Experts or vision-language models (TRL's engine keeps its own copy) get the
training limit and a reason instead of a rollout limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .planner import (
    CUDA_CONTEXT_GIB,
    TrainSetup,
    fewest_mlp_tiles,
    largest_fitting,
    pinned_host_bytes,
    plan_memory,
    trainable_state_bytes,
)
from .rollout_kv import VLLM_OTHER_GIB, kv_bytes_per_token, rollout_kv_tokens, vllm_weight_bytes
from .shapes import GIB, ModelShape

__all__ = ["StepCapacity", "rollout_capacity_problem", "shares_weights_with_vllm", "step_capacity"]

# The search stops here: a per-device batch beyond it is not a GRPO setting anyone runs.
MOST_SEQUENCES = 4096


@dataclass(frozen=True)
class StepCapacity:
    """The most sequences of one length per step on one GPU.

    Args:
        training: Sequences per device batch whose training step fits (0: not one).
        training_bound: What stops one more: "GPU memory", "host memory" (the offloaded checkpoints to pin) or
            "search limit" (`MOST_SEQUENCES`).
        rollout: Sequences one rollout decodes at once, or `None` where it is not modeled (`rollout_note` says why).
        rollout_note: Why the rollout is not modeled; `None` when it is.
    """

    training: int
    training_bound: str
    rollout: int | None
    rollout_note: str | None = None


def shares_weights_with_vllm(shape: ModelShape, mode: str) -> bool:
    """Whether the rollout plan shares the trainer's weights with the colocated engine for `shape` in `mode` (else
    TRL's engine or vLLM keeps a second copy): not for full fine-tuning, nor for 4-bit MoE or vision-language models."""
    return mode != "full" and not (mode == "qlora" and (shape.num_experts or shape.vision is not None))


def rollout_capacity_problem(shape: ModelShape, mode: str) -> str | None:
    """Why the rollout side of `mode` on `shape` is not modeled, or `None` when it is (where the weights are shared
    with vLLM: `shares_weights_with_vllm`)."""
    # The rollout plan keeps TRL's engine for 4-bit MoE checkpoints (vLLM quantizes fused experts in its own layout)
    # and 4-bit vision-language ones (not verified). bf16 experts are shared (sliding-window layers' KV is counted at
    # full length), and so are bf16 vision-language weights, the vision tower's included.
    if shape.num_experts and mode == "qlora":
        return "4-bit Mixture-of-Experts models keep TRL's engine, a second copy of the weights"
    if shape.vision is not None and mode == "qlora":
        return "4-bit vision-language models keep TRL's engine, a second copy of the weights"
    if mode == "full":  # shared weights need LoRA: full fine-tuning would train vLLM's weights in place
        return "full fine-tuning keeps vLLM's own copy of the weights beside the trainer's"
    return None


def step_capacity(
    shape: ModelShape,
    setup: TrainSetup,
    gpu_memory_gib: float,
    *,
    host_memory_gib: float | None = None,
    tile_mlps: bool = True,
) -> StepCapacity:
    """The training and rollout limits (module docstring) at `setup`'s prompt and completion lengths.

    Args:
        setup: The step; its `num_generations` is ignored, its `grpo_mini_batch` (when set) caps the mini batch.
        gpu_memory_gib: Memory of the GPU.
        host_memory_gib: Host memory the offloaded checkpoints may pin; `None` = not limited.
        tile_mlps: Let the training step tile its MLPs (the trainer does on CUDA with `tiled_mlp_chunks=None`).

    Example:
        >>> from trl_longctx.memory import PRESETS
        >>> capacity = step_capacity(PRESETS["qwen3-1.7b"], TrainSetup(1, 256, 4096), 80)
        >>> capacity.training > capacity.rollout > 8
        True
    """
    budget = gpu_memory_gib * GIB

    def at(sequences: int) -> TrainSetup:
        return replace(setup, num_generations=sequences, grpo_mini_batch=min(setup.grpo_mini_batch or 1, sequences))

    def host_holds(sequences: int) -> bool:
        return host_memory_gib is None or pinned_host_bytes(shape, at(sequences)) <= host_memory_gib * GIB

    def gpu_holds(sequences: int) -> bool:
        if tile_mlps:
            return fewest_mlp_tiles(shape, at(sequences), budget) is not None
        return plan_memory(shape, at(sequences)).total <= budget

    training = largest_fitting(lambda n: host_holds(n) and gpu_holds(n), MOST_SEQUENCES)
    if training == MOST_SEQUENCES:
        bound = "search limit"
    else:
        bound = "host memory" if not host_holds(training + 1) else "GPU memory"
    problem = rollout_capacity_problem(shape, setup.mode)
    if problem is not None:
        return StepCapacity(training, bound, None, problem)
    other = (
        vllm_weight_bytes(shape, setup.mode)
        + (VLLM_OTHER_GIB + CUDA_CONTEXT_GIB) * GIB
        + trainable_state_bytes(shape, setup)
    )
    per_sequence = rollout_kv_tokens(1, setup.prompt_length, setup.completion_length) * kv_bytes_per_token(shape)
    rollout = max(0, int((budget - other) // per_sequence))
    return StepCapacity(training, bound, min(rollout, MOST_SEQUENCES))
