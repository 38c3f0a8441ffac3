"""Views of vLLM's bitsandbytes 4-bit weights as bitsandbytes ``Linear4bit`` layers (QLoRA with one copy in memory).

vLLM's bitsandbytes layout (vLLM 0.25-0.28, ``quantization="bitsandbytes"``; ``model_executor/layers/quantization/
bitsandbytes.py`` and ``model_loader/bitsandbytes_loader.py``): each linear layer holds one packed ``uint8`` weight of
shape ``[sum(out_i * in) / pack_factor, 1]``, the 4-bit codes of its shards (q, k, v of ``qkv_proj``; gate, up of
``gate_up_proj``; a single shard elsewhere) one after the other. The parameter carries ``bnb_shard_offsets`` (row
offsets of the shards, ``len = shards + 1``) and ``bnb_quant_state`` (``{shard index: bitsandbytes QuantState}``,
shape ``(out_i, in)`` each; vLLM dequantizes double quantization at load, so ``absmax`` is float32 and ``nested`` is
False). A shard is therefore exactly what bitsandbytes' ``Params4bit`` holds: its packed rows plus its QuantState.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Packed4bitShard:
    """One shard of a vLLM 4-bit weight: ``data`` is a view ``[out * in / pack_factor, 1]`` (uint8) of vLLM's packed
    tensor, ``quant_state`` its bitsandbytes QuantState (``shape == (out, in)``)."""

    data: torch.Tensor
    quant_state: Any

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.quant_state.shape[1])


def is_packed_4bit(param: torch.Tensor) -> bool:
    """Whether ``param`` is a vLLM bitsandbytes 4-bit weight (packed shards with per-shard quantization states)."""
    return bool(getattr(param, "use_bitsandbytes_4bit", False)) and isinstance(
        getattr(param, "bnb_quant_state", None), dict
    )


def split_packed_4bit(param: torch.Tensor) -> list[Packed4bitShard]:
    """The shards of a vLLM 4-bit weight, in shard order, as views of its storage (nothing copied).

    Raises:
        RuntimeError: If the offsets and quantization states disagree (a vLLM layout this module does not know).
    """
    states = param.bnb_quant_state
    offsets = [int(o) for o in param.bnb_shard_offsets]
    pack_factor = int(param.pack_factor)
    data = param.detach()  # a plain tensor on the same storage (vLLM's parameter class is a Parameter subclass)
    if sorted(states) != list(range(len(states))) or len(offsets) != len(states) + 1 or offsets[-1] != data.shape[0]:
        raise RuntimeError(
            f"unknown vLLM 4-bit layout: shards {sorted(states)}, offsets {offsets}, packed rows {data.shape[0]}"
        )
    shards = []
    for index in range(len(states)):
        state = states[index]
        rows = offsets[index + 1] - offsets[index]
        if getattr(state, "nested", False) or rows * pack_factor != state.shape[0] * state.shape[1]:
            raise RuntimeError(
                f"unknown vLLM 4-bit layout: shard {index} has {rows} packed rows for shape {tuple(state.shape)} "
                f"(pack factor {pack_factor}, nested {getattr(state, 'nested', None)})"
            )
        shards.append(Packed4bitShard(data[offsets[index] : offsets[index + 1]], state))
    return shards


def linear_4bit_view(shard: Packed4bitShard, compute_dtype: torch.dtype, bias: torch.Tensor | None = None):
    """A frozen bitsandbytes ``Linear4bit`` whose weight is ``shard.data`` itself (same storage) with its QuantState.

    Args:
        shard: A shard from :func:`split_packed_4bit`.
        compute_dtype: dtype the layer computes in (vLLM's model dtype, e.g. ``torch.bfloat16``).
        bias: Optional ``[out]`` tensor, also used as it is (a view of vLLM's bias).
    """
    import bitsandbytes as bnb

    state = shard.quant_state
    layer = bnb.nn.Linear4bit(
        shard.in_features, shard.out_features, bias=bias is not None, compute_dtype=compute_dtype,
        compress_statistics=False, quant_type=state.quant_type, device="meta",
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        shard.data, requires_grad=False, quant_state=state, blocksize=state.blocksize, compress_statistics=False,
        quant_type=state.quant_type, bnb_quantized=True, module=layer,
    )  # fmt: skip
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


def bitsandbytes_in_vllm() -> bool:
    """Whether this vLLM can quantize with bitsandbytes: its layers exist (CUDA builds; the CPU build has none) and
    the `bitsandbytes` package they import is installed."""
    import importlib.util

    layers = importlib.util.find_spec("vllm.model_executor.layers.quantization.bitsandbytes") is not None
    return layers and importlib.util.find_spec("bitsandbytes") is not None
