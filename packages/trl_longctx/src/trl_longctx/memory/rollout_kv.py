"""The vLLM side of a colocated GRPO step: the KV cache a rollout needs and the `gpu_memory_utilization` that holds it.

Plain Python, like the planner. With shared weights and KV standby the two sides take turns on one GPU: while the
trainer runs, vLLM holds only the (shared) weights; for a rollout it maps its KV cache back. vLLM's budget is
`gpu_memory_utilization * GPU memory` for its own tensors: the weights (one bf16 copy: `2 * params` bytes), the
activations of its profiled forward and sampler, and the KV cache, which gets the rest. A rollout of `n` sequences of
`P + L` tokens needs `n * ceil((P + L) / 16) * 16` tokens of it (blocks of 16 tokens), at `2 * layers * kv_heads *
head_dim * 2` bytes per token (K and V, bf16).

Checked against the KV caches and weights of vLLM 0.25 engines (Qwen3-32B at utilizations 0.9 and 0.5, Qwen3-1.7B at
0.95): the bytes per token and the weights are as the formulas give; what else vLLM held varied between engines, and
`VLLM_OTHER_GIB` is the largest of it, so the utilization printed is enough for each of them.

QLoRA (`mode="qlora"`): vLLM quantizes the checkpoint's linear layers to 4 bits with bitsandbytes when it loads them
and keeps one float32 scale per block of 64 weights (it dequantizes nested scales at load), `shapes.NF4_BYTES_PER_PARAM`;
embeddings, lm_head and norms stay bf16. Against one vLLM 0.25 engine of Qwen3-8B: 5.96 GiB by the formula, 6.21 GiB
loaded (what else it allocated while loading, LoRA slots among it, is in the 0.25 GiB); in use with the KV cache
released, 9.02 GiB, within the formula plus `VLLM_OTHER_GIB`.
"""

from __future__ import annotations

import math

from .shapes import BF16, GIB, NF4_BYTES_PER_PARAM, ModelShape

KV_BLOCK_TOKENS = 16
# vLLM memory that is neither weights nor KV cache (profiled activations, sampler, CUDA graphs) with
# `max_num_batched_tokens=4096` (TRL's and our colocate setting): the largest measured.
VLLM_OTHER_GIB = 3.0


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int = BF16) -> int:
    """Bytes of vLLM's KV cache per token: K and V of every layer, `dtype_bytes` per element (bf16: 2)."""
    return 2 * shape.num_hidden_layers * shape.kv_size * dtype_bytes


def vllm_weight_bytes(shape: ModelShape, mode: str = "lora") -> int:
    """Bytes of the one copy of the weights vLLM holds (shared with the trainer under shared weights): bf16, or with
    `mode="qlora"` its linear layers in 4 bits (`NF4_BYTES_PER_PARAM`: vLLM keeps no nested scales) and the rest bf16."""
    if mode == "qlora":
        return int(NF4_BYTES_PER_PARAM * shape.linear_params()) + BF16 * (shape.total_params() - shape.linear_params())
    return BF16 * shape.total_params()


def rollout_kv_tokens(sequences: int, prompt_length: int, completion_length: int) -> int:
    """KV tokens that `sequences` sequences of `prompt_length + completion_length` tokens take at once (whole blocks)."""
    blocks = math.ceil((prompt_length + completion_length) / KV_BLOCK_TOKENS)
    return sequences * blocks * KV_BLOCK_TOKENS


def min_vllm_utilization(
    shape: ModelShape, sequences: int, prompt_length: int, completion_length: int, gpu_gib: float, mode: str = "lora"
) -> float:
    """The smallest `gpu_memory_utilization` whose KV cache holds the whole rollout at once (may exceed 1); `mode` as
    in `vllm_weight_bytes`."""
    need = vllm_weight_bytes(shape, mode) + rollout_kv_tokens(sequences, prompt_length, completion_length) * (
        kv_bytes_per_token(shape)
    )
    return (need + VLLM_OTHER_GIB * GIB) / (gpu_gib * GIB)


def utilization_kv_cache_bytes(shape: ModelShape, utilization: float, device_bytes: float) -> int:
    """A lower bound of the KV cache vLLM sizes itself at `utilization` of a device of `device_bytes` bytes: the
    budget less one bf16 copy of the weights and `VLLM_OTHER_GIB` (0 when nothing is left)."""
    return max(0, int(utilization * device_bytes - vllm_weight_bytes(shape) - VLLM_OTHER_GIB * GIB))


# vLLM's KV block sizes (16 on CUDA, larger on some backends and on the CPU build) all divide this: a sequence rounded
# up to it fills whole blocks whatever the block size.
KV_SEQUENCE_ROUNDING = 256


def rollout_kv_cache_bytes(shape: ModelShape, max_num_seqs: int, max_model_len: int, dtype_bytes: int = BF16) -> int:
    """Bytes of a KV cache that holds `max_num_seqs` sequences of `max_model_len` tokens at once: the most one rollout
    can use (vLLM never runs more sequences at once, and none longer). Each sequence is rounded up to
    `KV_SEQUENCE_ROUNDING` tokens so that it fills whole blocks of any of vLLM's block sizes."""
    tokens = math.ceil(max_model_len / KV_SEQUENCE_ROUNDING) * KV_SEQUENCE_ROUNDING
    return max_num_seqs * tokens * kv_bytes_per_token(shape, dtype_bytes)
