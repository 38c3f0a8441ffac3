"""`vllm_standby.fp8_quant.quantize_rows`: per-row FP8 codes and scales, with and without column factors.

Exactness, not tolerances: the torch path equals the float64 reference computed from the same float32 products
(`x * col_scale`), code for code and scale for scale; on CUDA the Triton kernel equals the torch path bit for bit
(the same float32 arithmetic, round-to-nearest-even into FP8).
"""

from __future__ import annotations

import pytest
import torch

from vllm_standby.fp8_quant import FP8_DTYPE, FP8_MAX, MIN_SCALE, quantize_rows, quantizer


def _reference(x, col_scale=None):
    v = x.float() if col_scale is None else x.float() * col_scale.float()
    v64 = v.double()
    scale = (v64.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE).float()
    codes = (v64 / scale.double()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_cols", [False, True], ids=["rows", "rows-times-columns"])
def test_codes_and_scales_equal_the_reference(dtype, with_cols):
    x = (torch.randn(37, 301) * torch.logspace(-3, 2, 37)[:, None]).to(dtype)
    x[5] = 0  # an all-zero row gets the smallest scale, and zero codes
    col_scale = torch.rand(301) * 0.01 + 1e-4 if with_cols else None
    codes, scale = quantize_rows(x, col_scale)
    expected_codes, expected_scale = _reference(x, col_scale)
    assert codes.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (37, 1)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))
    assert scale[5].item() == pytest.approx(MIN_SCALE) and not codes[5].float().any()
    # The codes span the format: each row's largest magnitude is 448, unless the smallest scale holds it below.
    above = expected_scale.squeeze(1) > MIN_SCALE
    assert above.sum() > 10 and codes.float().abs().amax(dim=1)[above].eq(FP8_MAX).all()


def test_strided_rows_and_chunks_change_nothing(monkeypatch):
    import vllm_standby.fp8_quant as module

    x = torch.randn(20, 64)
    whole = quantize_rows(x[:, ::2])  # a non-contiguous input
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 3 * 32 + 1)  # 3 rows per chunk
    chunked = quantize_rows(x[:, ::2].contiguous())
    assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[0].view(torch.uint8), chunked[0].view(torch.uint8))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"quantize_rows needs a 2-D tensor, got shape \(2, 3, 4\)"):
        quantize_rows(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"col_scale needs one factor per column of x \(4\), got 3 elements"):
        quantize_rows(torch.randn(2, 4), torch.ones(3))


def test_the_quantizer_says_which_runs_and_why():
    assert quantizer(torch.device("cpu")) == ("torch", "by torch on cpu (the Triton kernel runs on CUDA only)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cols", [4096, 12288, 301])
@pytest.mark.parametrize("with_cols", [False, True], ids=["rows", "rows-times-columns"])
def test_the_triton_kernel_equals_the_torch_path(cols, with_cols):
    import vllm_standby.fp8_quant as module

    assert quantizer(torch.device("cuda"))[0] == "triton"
    x = (torch.randn(333, cols, device="cuda") * 3).to(torch.bfloat16)
    x[7] = 0
    col_scale = torch.rand(cols, device="cuda") * 0.01 + 1e-4 if with_cols else None
    codes, scale = quantize_rows(x, col_scale)
    torch_codes, torch_scale = module._quantize_rows_torch(x, None if col_scale is None else col_scale.contiguous())
    assert torch.equal(scale, torch_scale)
    assert torch.equal(codes.view(torch.uint8), torch_codes.view(torch.uint8))
