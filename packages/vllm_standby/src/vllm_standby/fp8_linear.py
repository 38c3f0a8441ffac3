"""``Fp8Linear``: a frozen linear layer on an FP8 (``float8_e4m3fn``) weight and its scales, with LoRA on top.

The layer holds the weight and scales as they are (views of vLLM's tensors, see :mod:`vllm_standby.shared_fp8`) and
never a higher-precision copy. Its forward runs one of two matmuls, chosen once per layer (``matmul``):

- ``"dequantize"``: the weight is dequantized to the input's dtype for the length of the call
  (``weight.float() * scale``, rounded once) and multiplied as usual: weights in FP8, arithmetic in bf16 (W8A16).
- ``"scaled_mm"``: ``torch._scaled_mm`` multiplies FP8 by FP8, forward and backward (W8A8). The input is quantized
  per token with a dynamic scale, as vLLM's CUTLASS kernels quantize activations for per-tensor and per-channel
  weights, so the trainer's log-probs follow the sampler's numerics more closely; the input gradient is the output
  gradient, times a per-channel weight scale, quantized per row the same way, times the FP8 weight (the row-wise FP8
  training recipe). Both quantizations run in one Triton kernel each on CUDA (:mod:`vllm_standby.fp8_quant`). CUDA
  needs compute capability >= 8.9 (Ada, Hopper); torch's CPU implementation runs it too (for tests, not speed).
  Per-block scales have no path here.

``"auto"`` picks ``"dequantize"``, whose arithmetic is bf16's: ``"scaled_mm"`` rounds activations and gradients to
FP8 (about 2^-4 relative per element), which puts its output and gradients further from the exact product.
:func:`resolve_matmul` says what it picked and why, so the caller can log it. The backward gives the gradient of the
input only (and of the bias, if something trains it): the weight is frozen. The dequantizing backward dequantizes the
weight again instead of keeping a bf16 copy from the forward, so a step never holds more than one layer's
dequantized weight (or, with ``"scaled_mm"``, its transposed FP8 copy) at a time.

``Fp8Linear`` subclasses ``torch.nn.Linear`` so that PEFT treats it as one: ``target_modules="all-linear"`` finds
it and PEFT's default dispatch wraps it in its ``lora.Linear``, whose forward calls this layer's and adds the LoRA
branch. PEFT moves a new adapter to its base layer's dtype, read from ``compute_dtype`` when the layer has one (as
bitsandbytes' layers do), which keeps the adapter out of FP8. ``Module.to(dtype)`` would cast the FP8 weight like any
floating-point parameter (a copy: the sharing with vLLM ends); nothing in the trainer calls it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from vllm_standby.fp8_quant import FP8_DTYPE, quantize_rows, quantizer

#: Values of ``matmul``.
MATMULS = ("auto", "scaled_mm", "dequantize")
#: Why ``"auto"`` dequantizes (module docstring).
AUTO_REASON = (
    "dequantized to the input's dtype per matmul, bf16 arithmetic (matmul='scaled_mm' multiplies per-row FP8 "
    "activations and gradients by the FP8 weight instead)"
)
#: How the scales of a weight are laid out.
SCALE_KINDS = ("per-tensor", "per-channel", "per-block")
# Float32 temporaries of dequantization are made this many elements at a time (64 MiB):
# a whole-tensor float32 copy of a long sequence's activations would be 4 bytes x tokens x hidden (2 GiB at 128K
# tokens x 4,096).
_CHUNK_ELEMENTS = 16 * 2**20
# torch._scaled_mm on CUDA: FP8 tensor cores from compute capability 8.9; both matrix dims multiples of 16.
_SCALED_MM_CAPABILITY = (8, 9)
_SCALED_MM_ALIGNMENT = 16


def scale_kind(
    weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None = None, row_offset: int = 0
) -> str:
    """The layout of ``scale`` for the FP8 ``weight`` ``[out, in]``: one of :data:`SCALE_KINDS`.

    Args:
        weight: ``[out, in]``, ``float8_e4m3fn``.
        scale: float32. Per-tensor: one element. Per-channel: ``[out, 1]`` (or ``[out]``). Per-block: the block rows
            covering rows ``row_offset .. row_offset + out`` of the block grid, ``[rows, ceil(in / block_in)]``.
        block_size: ``(block_out, block_in)`` for per-block scales, else ``None``.
        row_offset: Per-block: the weight's first row inside its first block row (a shard of a fused layer that
            starts inside a block).

    Raises:
        ValueError: The scale does not fit the weight (the message names both shapes).
    """
    out, cols = weight.shape
    if scale.dtype != torch.float32:
        raise ValueError(f"FP8 weight scales must be float32, got {scale.dtype} for a weight {tuple(weight.shape)}")
    if block_size is None:
        if scale.numel() == 1:
            return "per-tensor"
        if tuple(scale.shape) in ((out, 1), (out,)):
            return "per-channel"
        raise ValueError(
            f"FP8 weight {tuple(weight.shape)}: scale {tuple(scale.shape)} is neither per-tensor (one element) nor "
            f"per-channel ({out}, 1); per-block scales need block_size"
        )
    block_out, block_in = block_size
    rows = -(-(row_offset + out) // block_out)
    if not 0 <= row_offset < block_out or tuple(scale.shape) != (rows, -(-cols // block_in)):
        raise ValueError(
            f"FP8 weight {tuple(weight.shape)} with blocks {block_size} starting at row {row_offset} of its first "
            f"block needs a scale of shape ({rows}, {-(-cols // block_in)}), got {tuple(scale.shape)}"
        )
    return "per-block"


def dequantize_fp8(
    weight: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    block_size: tuple[int, int] | None = None,
    row_offset: int = 0,
) -> torch.Tensor:
    """``weight * scale`` as a new ``[out, in]`` tensor of ``dtype``: computed in float32, rounded once.

    Args:
        weight: ``[out, in]``, ``float8_e4m3fn`` (any strides).
        scale: float32, laid out as :func:`scale_kind` describes.
        dtype: dtype of the result.
        block_size, row_offset: Per-block scales, as :func:`scale_kind`.
    """
    out, cols = weight.shape
    if block_size is None:
        factor = scale.reshape(-1, 1).expand(out, 1)  # per tensor or per row
    else:
        block_out, block_in = block_size
        rows = scale.repeat_interleave(block_out, dim=0)[row_offset : row_offset + out]
        factor = rows.repeat_interleave(block_in, dim=1)[:, :cols]
    result = torch.empty(out, cols, dtype=dtype, device=weight.device)
    for rows in _row_chunks(out, cols):
        # The product is computed in float32 and rounded once as it is stored into `result`: no float32 copy of it.
        torch.mul(weight[rows].to(torch.float32), factor[rows], out=result[rows])
    return result


def _row_chunks(rows: int, cols: int) -> list[slice]:
    """Row ranges of at most `_CHUNK_ELEMENTS` elements (at least one row each)."""
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def capability_problem(capability: tuple[int, int]) -> str | None:
    """Why a CUDA GPU of this compute capability cannot run FP8 matmuls, or ``None`` when it can."""
    if tuple(capability) < _SCALED_MM_CAPABILITY:
        return (
            "FP8 matmuls (torch._scaled_mm, vLLM's CUTLASS FP8 kernels) need a GPU of compute capability >= 8.9 "
            f"(Ada, Hopper or newer); this one has {capability[0]}.{capability[1]}"
        )
    return None


def scaled_mm_problem(weight: torch.Tensor, kind: str) -> str | None:
    """Why ``torch._scaled_mm`` cannot run this layer here, or ``None`` when it can."""
    device = weight.device
    if kind == "per-block":
        return "its scales are per block (no block-scaled torch._scaled_mm path here)"
    if device.type == "cuda":
        problem = capability_problem(torch.cuda.get_device_capability(device))
        if problem is not None:
            return problem
        if any(size % _SCALED_MM_ALIGNMENT for size in weight.shape):
            return f"torch._scaled_mm on CUDA needs both weight dims to be multiples of 16, got {tuple(weight.shape)}"
        return None
    if device.type != "cpu":
        return f"no torch._scaled_mm FP8 path on {device.type}"
    if not _cpu_rowwise_scaled_mm():
        return (
            f"torch {torch.__version__}'s CPU torch._scaled_mm takes per-tensor scales only, and this layer's "
            "activations take one scale per row (torch 2.13's CPU build takes them)"
        )
    return None


@functools.cache
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``torch._scaled_mm`` takes a scale per row of each operand (tried once, on 16 x 16)."""
    a = torch.ones(16, 16).to(FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def resolve_matmul(matmul: str, weight: torch.Tensor, kind: str) -> tuple[str, str]:
    """``matmul`` with ``"auto"`` resolved for this layer, and why, in words (for the log).

    Args:
        matmul: One of :data:`MATMULS`.
        weight: The layer's FP8 weight (with `"scaled_mm"`, its device and shape decide whether it can run).
        kind: The layer's scale layout (:data:`SCALE_KINDS`).

    Returns:
        ``("scaled_mm" | "dequantize", reason)``.

    Raises:
        ValueError: An unknown ``matmul``, or ``"scaled_mm"`` where it cannot run (the message says why and what is
            allowed).
    """
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {list(MATMULS)}, got {matmul!r}.")
    if matmul == "dequantize":
        return "dequantize", "matmul='dequantize'"
    if matmul == "auto":
        return "dequantize", f"matmul='auto': {AUTO_REASON}"
    problem = scaled_mm_problem(weight, kind)
    if problem is not None:
        raise ValueError(f"matmul='scaled_mm' cannot run this layer: {problem}. Allowed here: 'dequantize', 'auto'.")
    return "scaled_mm", f"matmul='scaled_mm'; rows quantized {quantizer(weight.device)[1]}"


def scaled_mm_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ (weight * scale).T`` through ``torch._scaled_mm``, ``x`` quantized per row (W8A8).

    Args:
        x: ``[M, K]`` floating point.
        weight: ``[N, K]`` FP8 with rows contiguous (``weight.T`` is the column-major operand ``_scaled_mm`` wants).
        scale: Per-tensor (one element) or per-channel (``[N, 1]``) float32.
        out_dtype: dtype of the ``[M, N]`` result.
    """
    x_fp8, x_scale = quantize_rows(x)
    n = weight.shape[0]
    weight_scale = scale.to(torch.float32).reshape(1, -1).expand(1, n).contiguous()
    return torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)


def scaled_mm_fp8_input_grad(
    grad: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``grad @ (weight * scale)`` through ``torch._scaled_mm``: the input gradient of :func:`scaled_mm_fp8`'s layer,
    FP8 by FP8 as its forward.

    A per-channel scale multiplies the columns of ``grad`` (``grad * scale.T``) before ``grad`` is quantized per row;
    a per-tensor scale goes to ``_scaled_mm``'s weight scale. The weight is read transposed: ``_scaled_mm`` wants its
    second operand column-major, so a transposed FP8 copy of this one layer's weight exists for the call.

    Args:
        grad: ``[M, N]`` gradient of the layer's output.
        weight: ``[N, K]`` FP8.
        scale: Per-tensor (one element) or per-channel (``[N, 1]``) float32.
        out_dtype: dtype of the ``[M, K]`` result.
    """
    per_channel = scale.numel() > 1
    codes, row_scale = quantize_rows(grad, scale.reshape(-1) if per_channel else None)
    k = weight.shape[1]
    weight_scale = (torch.ones(1, device=weight.device) if per_channel else scale.reshape(1)).to(torch.float32)
    column_major = weight.t().contiguous().t()  # [N, K], stride (1, N)
    return torch._scaled_mm(codes, column_major, scale_a=row_scale,
                            scale_b=weight_scale.expand(1, k).contiguous(), out_dtype=out_dtype)  # fmt: skip


class Fp8MatmulFunction(torch.autograd.Function):
    """``x @ W.T + bias`` for a frozen FP8 ``W``: gradients for ``x`` (and ``bias``), never for ``W`` or its scales."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, block_size, row_offset, matmul, compute_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        if matmul == "scaled_mm":
            # The activation rounding is this layer's own (float32, as vLLM's): an enclosing autocast must not touch it.
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = scaled_mm_fp8(x2, weight, scale, compute_dtype).to(x.dtype)
        else:
            out = x2 @ dequantize_fp8(weight, scale, x.dtype, block_size, row_offset).t()
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(weight, scale)
        ctx.block_size, ctx.row_offset, ctx.x_dtype = block_size, row_offset, x.dtype
        ctx.matmul, ctx.compute_dtype = matmul, compute_dtype
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("FP8 weights and their scales are frozen: no gradient flows to them.")
        grad_x = grad_bias = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            # The quantization of the input in the scaled_mm path counts as the identity here (straight through).
            if ctx.matmul == "scaled_mm":
                with torch.autocast(device_type=grad_out.device.type, enabled=False):
                    grad_x = scaled_mm_fp8_input_grad(grad_2d, weight, scale, ctx.compute_dtype)
            else:
                grad_x = grad_2d @ dequantize_fp8(weight, scale, grad_out.dtype, ctx.block_size, ctx.row_offset)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(dim=0)
        return grad_x, None, None, grad_bias, None, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_size: tuple[int, int] | None = None,
    row_offset: int = 0,
    matmul: str = "dequantize",
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` for a frozen FP8 weight: the one switch between the two matmuls.

    Args:
        x: ``[..., in]`` floating point, on the weight's device.
        weight: ``[out, in]`` ``float8_e4m3fn``.
        scale: float32 scales, laid out as :func:`scale_kind` describes.
        bias: Optional ``[out]``.
        block_size, row_offset: Per-block scales, as :func:`scale_kind`.
        matmul: ``"dequantize"`` or ``"scaled_mm"`` (resolved: see :func:`resolve_matmul`).
        compute_dtype: Output dtype of ``torch._scaled_mm`` (then cast to ``x``'s dtype); unused by
            ``"dequantize"``, which computes in ``x``'s dtype.

    Returns:
        ``[..., out]`` in ``x``'s dtype.

    Example:
        >>> weight = (torch.randn(32, 64) * 8).to(torch.float8_e4m3fn)
        >>> fp8_linear(torch.randn(3, 64), weight, torch.full((32, 1), 0.01)).shape
        torch.Size([3, 32])
    """
    if matmul not in ("dequantize", "scaled_mm"):
        raise ValueError(f"fp8_linear's matmul must be 'dequantize' or 'scaled_mm' (resolved), got {matmul!r}.")
    return Fp8MatmulFunction.apply(x, weight, scale, bias, block_size, row_offset, matmul, compute_dtype)


class Fp8Linear(torch.nn.Linear):
    """A frozen ``nn.Linear`` whose weight is FP8 with its scales, used as they are (no copy); PEFT's LoRA wraps it.

    Args:
        weight: ``[out, in]`` ``float8_e4m3fn`` (e.g. a view of vLLM's weight).
        weight_scale: float32 scales (:func:`scale_kind`), also used as they are.
        bias: Optional ``[out]`` tensor, used as it is.
        block_size, row_offset: Per-block scales, as :func:`scale_kind`.
        compute_dtype: The dtype the layer computes in with bf16 models; PEFT gives the adapters it adds this dtype.
        matmul: One of :data:`MATMULS`, resolved once here (:attr:`matmul`, :attr:`matmul_reason`).

    Raises:
        ValueError: ``weight`` is not a 2-D ``float8_e4m3fn`` tensor, the scale does not fit it, or ``matmul`` cannot
            run here.

    Example:
        >>> weight = (torch.randn(32, 64) * 8).to(torch.float8_e4m3fn)
        >>> layer = Fp8Linear(weight, torch.full((32, 1), 0.01), matmul="dequantize")
        >>> layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        block_size: tuple[int, int] | None = None,
        row_offset: int = 0,
        compute_dtype: torch.dtype = torch.bfloat16,
        matmul: str = "auto",
    ):
        torch.nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"Fp8Linear needs a 2-D {FP8_DTYPE} weight, got {weight.dtype} {tuple(weight.shape)}.")
        self.out_features, self.in_features = weight.shape
        self.block_size = tuple(block_size) if block_size is not None else None
        self.row_offset = row_offset
        self.scale_kind = scale_kind(weight, weight_scale, self.block_size, row_offset)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(weight_scale, requires_grad=False)
        if bias is not None:
            self.bias = torch.nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.compute_dtype = compute_dtype
        self.matmul, self.matmul_reason = resolve_matmul(matmul, weight, self.scale_kind)

    def reset_parameters(self) -> None:
        raise RuntimeError(
            "Fp8Linear holds frozen FP8 weights (views of another owner's tensors): never re-initialized."
        )

    def set_matmul(self, matmul: str) -> str:
        """Resolve ``matmul`` (:data:`MATMULS`) for this layer and use it from now on; returns what was picked."""
        self.matmul, self.matmul_reason = resolve_matmul(matmul, self.weight, self.scale_kind)
        return self.matmul

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a new ``[out, in]`` tensor of ``dtype`` (default ``compute_dtype``)."""
        return dequantize_fp8(
            self.weight, self.weight_scale, dtype or self.compute_dtype, self.block_size, self.row_offset
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x, self.weight, self.weight_scale, self.bias, block_size=self.block_size, row_offset=self.row_offset,
            matmul=self.matmul, compute_dtype=self.compute_dtype,
        )  # fmt: skip

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scales={self.scale_kind}{block}, matmul={self.matmul}"
        )


def set_matmul(model: torch.nn.Module, matmul: str) -> dict[str, int]:
    """Switch every :class:`Fp8Linear` in ``model`` to ``matmul`` (resolved per layer).

    Returns:
        How many layers run each resolved matmul, e.g. ``{"scaled_mm": 196}``.

    Raises:
        ValueError: ``matmul="scaled_mm"`` and a layer cannot run it (nothing is switched then).
    """
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    resolved = [resolve_matmul(matmul, m.weight, m.scale_kind) for m in layers]  # raises before any switch
    counts: dict[str, int] = {}
    for layer, (chosen, reason) in zip(layers, resolved, strict=True):
        layer.matmul, layer.matmul_reason = chosen, reason
        counts[chosen] = counts.get(chosen, 0) + 1
    return counts


def matmul_summary(model: torch.nn.Module) -> dict[str, Any]:
    """``{resolved matmul: (layer count, the first layer's reason)}`` over the :class:`Fp8Linear` layers of ``model``."""
    summary: dict[str, Any] = {}
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            count, reason = summary.get(module.matmul, (0, module.matmul_reason))
            summary[module.matmul] = (count + 1, reason)
    return summary
