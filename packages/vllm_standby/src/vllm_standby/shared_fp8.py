"""Views of vLLM's online-quantized FP8 weights (and their scales) as trainer layers: LoRA on FP8, one copy in memory.

vLLM quantizes a bf16/fp16 checkpoint to FP8 while loading it when built with ``quantization="fp8_per_tensor"``,
``"fp8_per_channel"`` or ``"fp8_per_block"`` (:data:`VLLM_QUANTIZATION`; these names exist from vLLM 0.25 to 0.34 and
select the same classes; plain ``"fp8"`` quantizes a bf16 checkpoint per tensor in 0.25 and refuses to in 0.32 and
0.34, so it is not used here). After ``process_weights_after_loading`` a linear layer (``LinearBase``: every
q/k/v/o, gate/up/down projection; embeddings and ``lm_head`` stay in the model dtype) holds, in
``model_executor/layers/quantization/online/fp8.py`` of vLLM 0.25.0, 0.32.0 and 0.34.0 (classes
``Fp8PerTensorOnlineLinearMethod``, ``Fp8PtpcOnlineLinearMethod``, ``Fp8PerBlockOnlineLinearMethod``):

- per tensor: ``weight`` ``float8_e4m3fn`` of shape ``[in, out]``, the transpose (a view, strides ``(1, in)``) of the
  row-major ``[out, in]`` codes, which is the column-major operand CUTLASS and ``torch._scaled_mm`` take;
  ``weight_scale`` float32 ``[1]``: ``amax / 448`` over the whole fused weight (q, k and v of ``qkv_proj`` share it;
  no scale per shard and so nothing to re-quantize to a common maximum: ``requantize_with_max_scale`` of
  ``quantization/utils/w8a8_utils.py`` does that only for FP8-serialized checkpoints, ``Fp8LinearMethod``).
  vLLM 0.25 computes the scale inside ``ops.scaled_fp8_quant(weight, scale=None)``; 0.32 and 0.34 as
  ``weight_amax(weight) / 448`` first.
- per channel ("PTPC"): the same transposed ``[in, out]`` weight; ``weight_scale`` float32 ``[out, 1]``, one per
  output row (``amax / 448`` of the row, at least ``1 / (448 * 512)``), so each shard of a fused layer has its rows.
- per block: ``weight`` ``float8_e4m3fn`` ``[out, in]`` row-major, not transposed; ``weight_scale_inv`` float32
  ``[ceil(out / 128), ceil(in / 128)]`` from ``vllm.utils.deep_gemm.per_block_cast_to_fp8`` (blocks of 128 x 128 over
  the fused weight: a shard that starts inside a block shares that block's scale with the shard before it);
  ``weight_block_size = [128, 128]`` on the layer.

Everywhere ``layer.logical_widths`` (= ``output_partition_sizes``) lists the shard widths (``[q, k, v]``,
``[gate, up]``, ``[out]``), ``layer.input_size_per_partition`` the input width, and ``layer.input_scale`` is ``None``:
activations are quantized dynamically per token (per tensor where CUTLASS is missing; per 1 x 128 group for block
weights) inside each matmul, so nothing is stored for them. The FP8 kernel chosen for the GPU can change the layout
after that (``model_executor/kernels/linear/scaled_mm/``): CUTLASS (compute capability >= 8.9, per tensor and per
channel) pads both weight dims to multiples of 16 with zeros (and a per-channel scale with ones) when they are not,
which the views here cut away; the FP8 Marlin kernel, picked below compute capability 8.9, repacks the weight into
int32 tiles, which cannot be viewed as ``[out, in]`` FP8 and is refused; DeepGEMM (when installed) re-lays block
scales out for its TMA loads, and on Blackwell re-quantizes them to powers of two stored as ``float8_e8m0fnu``
(refused: only float32 scales are read). On vLLM's CPU build per-channel weights keep the layout above (torch's
``_scaled_mm`` kernel, on CPUs without AMX), while per-tensor weights need a custom op the CPU build lacks and block
weights AMX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vllm_standby.fp8_linear import FP8_DTYPE, scale_kind

#: ``vllm.LLM(quantization=...)`` for each scale layout (vLLM's online-quantization shorthands, 0.25-0.34).
VLLM_QUANTIZATION = {"per-tensor": "fp8_per_tensor", "per-channel": "fp8_per_channel", "per-block": "fp8_per_block"}


@dataclass(frozen=True)
class Fp8Shard:
    """One shard (q, k, v, gate, up, or a whole unfused layer) of a vLLM FP8 linear layer, as views of its tensors.

    Attributes:
        weight: ``[out, in]`` ``float8_e4m3fn``, a view of vLLM's weight (rows contiguous).
        scale: float32, a view of vLLM's scale: the whole ``[1]`` per tensor, the shard's ``[out, 1]`` rows per
            channel, the block rows covering the shard per block.
        block_size: ``(128, 128)``-like for block scales, else ``None``.
        row_offset: Block scales: the shard's first row inside its first block row.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, int] | None = None
    row_offset: int = 0

    @property
    def kind(self) -> str:
        """``"per-tensor"``, ``"per-channel"`` or ``"per-block"``."""
        return scale_kind(self.weight, self.scale, self.block_size, self.row_offset)


def is_fp8_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds an FP8 weight directly (a vLLM linear layer quantized to FP8)."""
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return isinstance(weight, torch.Tensor) and weight.dtype == FP8_DTYPE


def check_not_repacked(module: torch.nn.Module, name: str) -> None:
    """Refuse a vLLM layer that has FP8 scales but no FP8 weight: the FP8 Marlin kernel (a GPU of compute capability
    below 8.9) repacked it into int32 tiles, which no ``[out, in]`` view can read.

    Raises:
        RuntimeError: Naming the layer, its weight's dtype and what to use instead.
    """
    params = getattr(module, "_parameters", {})
    if is_fp8_layer(module) or not ({"weight_scale", "weight_scale_inv"} & params.keys()):
        return
    weight = params.get("weight")
    raise RuntimeError(
        f"{name}: vLLM holds FP8 scales but a {getattr(weight, 'dtype', None)} weight: its FP8 Marlin kernel (GPUs of "
        "compute capability below 8.9) repacked the weight, which the trainer cannot view. Share bf16 weights, or "
        "4-bit NF4 weights (QLoRA), on such a GPU."
    )


def split_fp8_layer(module: torch.nn.Module, name: str = "layer") -> list[Fp8Shard]:
    """The shards of a vLLM FP8 linear layer in ``logical_widths`` order, as views of its weight and scales.

    Args:
        module: A vLLM linear layer after ``process_weights_after_loading`` with an FP8 weight (the module docstring
            describes the layouts read here).
        name: Its name, for error messages.

    Raises:
        RuntimeError: A layout this module does not know (the message names the layer and what was found).
    """
    weight = module.weight.detach()  # a plain tensor on the same storage (vLLM parameters are subclasses)
    widths = [int(w) for w in getattr(module, "logical_widths", None) or [module.output_size_per_partition]]
    out, cols = sum(widths), int(module.input_size_per_partition)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    params = module._parameters
    if params.get("weight_scale_inv") is not None:
        block = tuple(int(b) for b in module.weight_block_size)
        if tuple(weight.shape) != (out, cols) or weight.stride(1) != 1:
            raise _unknown(name, weight, f"block scales need the [{out}, {cols}] weight row-major")
        scale = params["weight_scale_inv"].detach()
        shards = []
        for offset, width in zip(offsets, widths, strict=True):
            first, end = offset // block[0], -(-(offset + width) // block[0])
            shards.append(Fp8Shard(weight[offset : offset + width], scale[first:end], block, offset % block[0]))
    elif params.get("weight_scale") is not None:
        # [in, out] column-major (maybe padded to multiples of 16 by CUTLASS): its transpose has contiguous rows.
        rows_major = weight.t()
        if weight.stride(0) != 1 or rows_major.shape[0] < out or rows_major.shape[1] < cols:
            raise _unknown(name, weight, f"per-tensor/per-channel scales need the [{cols}, {out}] weight column-major")
        scale = params["weight_scale"].detach()
        per_tensor = scale.numel() == 1
        if not per_tensor and (scale.dim() != 2 or scale.shape[1] != 1 or scale.shape[0] < out):
            raise _unknown(name, weight, f"scale {tuple(scale.shape)} is neither per tensor nor per channel")
        shards = [
            Fp8Shard(
                rows_major[offset : offset + width, :cols], scale if per_tensor else scale[offset : offset + width]
            )
            for offset, width in zip(offsets, widths, strict=True)
        ]
    else:
        raise _unknown(name, weight, "no weight_scale or weight_scale_inv")
    for index, shard in enumerate(shards):
        try:
            shard.kind  # noqa: B018 (validates the scale against the weight)
        except ValueError as error:
            raise _unknown(name, weight, f"shard {index}: {error}") from error
    return shards


def _unknown(name: str, weight: torch.Tensor, why: str) -> RuntimeError:
    return RuntimeError(
        f"unknown vLLM FP8 layout for {name}: weight {weight.dtype} {tuple(weight.shape)} strides {weight.stride()}; "
        f"{why}"
    )


def fp8_in_vllm() -> tuple[str, ...]:
    """The scale layouts (keys of :data:`VLLM_QUANTIZATION`) this vLLM can quantize a checkpoint to, read from its
    quantization methods (capability, not version). Empty when vLLM is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    methods: Any = set(QUANTIZATION_METHODS)
    return tuple(kind for kind, method in VLLM_QUANTIZATION.items() if method in methods)
