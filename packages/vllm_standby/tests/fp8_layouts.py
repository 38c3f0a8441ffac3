"""vLLM's online FP8 layouts built on CPU, for the FP8 tests (see `vllm_standby.shared_fp8` for the layouts).

Written from vLLM's formulas (0.25-0.34, `model_executor/layers/quantization/online/fp8.py`), not with its code, so
the tests need no CUDA and no vLLM: per tensor `amax / 448` of the fused weight, per channel `amax / 448` of each row
(at least `1 / (448 * 512)`), per block `amax / 448` of each 128 x 128 block (amax at least 1e-4, the weight zero-padded
to whole blocks); codes `(w / scale).clamp(-448, 448).to(float8_e4m3fn)`.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = (128, 128)


def quantize(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(codes [out, in] row-major, float32 scale)` of `weight` as vLLM's online quantization makes them."""
    w = weight.to(torch.float32)
    if kind == "per-tensor":
        scale = (w.abs().amax() / FP8_MAX).reshape(1)
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    if kind == "per-channel":
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1 / (FP8_MAX * 512))
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    rows, cols = w.shape
    padded = torch.zeros(-(-rows // BLOCK[0]) * BLOCK[0], -(-cols // BLOCK[1]) * BLOCK[1])
    padded[:rows, :cols] = w
    blocks = padded.view(padded.shape[0] // BLOCK[0], BLOCK[0], padded.shape[1] // BLOCK[1], BLOCK[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(1e-4) / FP8_MAX  # [row blocks, col blocks]
    codes = (blocks / scale[:, None, :, None]).to(FP8).view_as(padded)[:rows, :cols].contiguous()
    return codes, scale


def dequantized64(codes: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """The float64 weight `[out, in]` the codes and scale stand for."""
    w = codes.to(torch.float64)
    if kind != "per-block":
        return w * scale.to(torch.float64).reshape(-1, 1)
    s = scale.to(torch.float64).repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
    return w * s[: w.shape[0], : w.shape[1]]


class VLLMFp8Linear(torch.nn.Module):
    """A vLLM linear layer after `process_weights_after_loading` with online FP8: fused shards, vLLM's attributes.

    Args:
        widths: Output widths of the shards (`logical_widths`), e.g. `[q, k, v]`.
        in_features: Input width.
        kind: `"per-tensor"`, `"per-channel"` or `"per-block"`.
        pad16: Pad both dims of a per-tensor/per-channel weight to multiples of 16 as vLLM's CUTLASS kernel does.
        seed: Seed of the random bf16-range weight.
    """

    def __init__(self, widths: list[int], in_features: int, kind: str, pad16: bool = False, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        out = sum(widths)
        # Rows of different magnitudes, so that per-channel scales differ from shard to shard.
        weight = torch.randn(out, in_features, generator=generator) * torch.linspace(0.02, 0.3, out)[:, None]
        self.codes, self.scale = quantize(weight, kind)
        self.kind = kind
        self.logical_widths = list(widths)
        self.input_size_per_partition, self.output_size_per_partition = in_features, out
        if kind == "per-block":
            self.weight = torch.nn.Parameter(self.codes, requires_grad=False)
            self.weight_scale_inv = torch.nn.Parameter(self.scale, requires_grad=False)
            self.weight_block_size = list(BLOCK)
            return
        codes, scale = self.codes, self.scale
        if pad16:
            pad_k, pad_n = -in_features % 16, -out % 16
            codes = torch.nn.functional.pad(codes.view(torch.uint8), (0, pad_k, 0, pad_n)).view(FP8)
            if kind == "per-channel":
                scale = torch.nn.functional.pad(scale.reshape(-1), (0, pad_n), value=1.0).view(-1, 1)
        self.weight = torch.nn.Parameter(codes.t(), requires_grad=False)  # [in, out], column-major
        self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        self.input_scale = None

    def dequantized64(self) -> torch.Tensor:
        """The fused layer's float64 weight `[out, in]`."""
        return dequantized64(self.codes, self.scale, self.kind)
