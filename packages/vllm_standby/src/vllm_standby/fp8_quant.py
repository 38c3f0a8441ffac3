"""Per-row FP8 quantization of activations and gradients, as vLLM quantizes activations for its FP8 matmuls.

``quantize_rows(x, col_scale)`` returns ``codes`` (``float8_e4m3fn``) and one float32 scale per row such that
``codes * scale`` approximates ``x * col_scale``: in float32, ``v = x * col_scale`` (``col_scale`` optional, one factor
per column), ``scale = max(max|v| / 448, 1 / (448 * 512))`` per row, ``codes = fp8(clamp(v / scale, -448, 448))``
rounded to nearest even. ``col_scale`` lets a backward fold a weight's per-channel scales into the gradient it
quantizes.

Two implementations compute the same values:

- ``"triton"`` on CUDA where Triton imports: one kernel, each program a row, reading the row twice (its amax, then
  its codes) and writing one byte per element.
- ``"torch"`` elsewhere: eager passes a chunk of rows at a time (float32 temporaries of at most 64 MiB), about six
  times the memory traffic of the kernel. ``quantizer(device)`` says which runs and, for torch on CUDA, why.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_DTYPE", "FP8_MAX", "MIN_SCALE", "quantize_rows", "quantizer"]

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite ``float8_e4m3fn`` value.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
#: The smallest per-row scale, vLLM's (`scaled_fp8_quant`): an all-zero row gets a finite scale.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
# Float32 temporaries of the torch path are made this many elements at a time (64 MiB).
_CHUNK_ELEMENTS = 16 * 2**20

try:
    import triton
    import triton.language as tl

    _TRITON_ERROR: ImportError | None = None
except ImportError as error:  # Triton ships with CUDA builds of torch; CPU builds may lack it
    triton = tl = None
    _TRITON_ERROR = error


def quantizer(device: torch.device) -> tuple[str, str]:
    """``("triton" | "torch", why)``: the implementation ``quantize_rows`` runs for tensors on ``device``."""
    if device.type != "cuda":
        return "torch", f"by torch on {device.type} (the Triton kernel runs on CUDA only)"
    if triton is None:
        return "torch", f"by torch: Triton does not import ({_TRITON_ERROR!r}); a CUDA build of torch ships it"
    return "triton", "by one Triton kernel per call"


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (times ``col_scale``) ``[M, K]`` as FP8 codes ``[M, K]`` and float32 row scales ``[M, 1]`` (module doc).

    Args:
        x: ``[M, K]`` floating point, rows of unit stride in the last dimension not required.
        col_scale: Optional ``[K]`` float32 factors multiplied into the columns before quantizing.

    Raises:
        ValueError: ``x`` is not 2-D, or ``col_scale`` does not have ``K`` elements.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_rows needs a 2-D tensor, got shape {tuple(x.shape)}.")
    if col_scale is not None:
        if col_scale.numel() != x.shape[1]:
            raise ValueError(
                f"col_scale needs one factor per column of x ({x.shape[1]}), got {col_scale.numel()} elements."
            )
        col_scale = col_scale.reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()
    if quantizer(x.device)[0] == "triton" and x.numel() > 0:
        return _quantize_rows_triton(x, col_scale)
    return _quantize_rows_torch(x, col_scale)


def _quantize_rows_torch(x: torch.Tensor, col_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows_total, cols = x.shape
    scale = torch.empty(rows_total, 1, dtype=torch.float32, device=x.device)
    codes = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows_total, step):
        rows = slice(start, min(start + step, rows_total))
        v = x[rows].to(torch.float32)
        if col_scale is not None:
            v = v * col_scale
        scale[rows] = (torch.linalg.vector_norm(v, ord=float("inf"), dim=1, keepdim=True) / FP8_MAX).clamp_min(
            MIN_SCALE
        )
        codes[rows] = (v / scale[rows]).clamp_(-FP8_MAX, FP8_MAX)
    return codes, scale


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr,
        col_ptr,
        codes_ptr,
        scale_ptr,
        cols,
        stride_xm,
        stride_xk,
        stride_cm,
        HAS_COL: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FP8_MAX_C: tl.constexpr,
        MIN_SCALE_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, cols, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            ok = ks < cols
            v = tl.load(x_row + ks * stride_xk, mask=ok, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(col_ptr + ks, mask=ok, other=0.0)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, 0) / FP8_MAX_C, MIN_SCALE_C)
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, cols, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            ok = ks < cols
            v = tl.load(x_row + ks * stride_xk, mask=ok, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(col_ptr + ks, mask=ok, other=0.0)
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -FP8_MAX_C), FP8_MAX_C)
            tl.store(codes_ptr + row * stride_cm + ks, q.to(codes_ptr.dtype.element_ty), mask=ok)


def _quantize_rows_triton(x: torch.Tensor, col_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    codes = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = min(2048, triton.next_power_of_2(max(cols, 16)))
    _quantize_rows_kernel[(rows,)](
        x, x if col_scale is None else col_scale, codes, scale, cols, x.stride(0), x.stride(1), codes.stride(0),
        HAS_COL=col_scale is not None, BLOCK_K=block, FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE,
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return codes, scale
