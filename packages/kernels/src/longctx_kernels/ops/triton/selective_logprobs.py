"""Triton backend of ``selective_logprobs``: lm_head + log-softmax gather (+ entropy) without ``[N, V]`` logits.

Memory: stock code holds ``N * V`` logits (bf16, 46 GiB at N = 128K, V = 152K, plus their fp32 log-softmax).
Here tokens go in chunks of ``ROW_CHUNK`` rows and the vocabulary in chunks of ``VOCAB_CHUNK`` columns; one
``[ROW_CHUNK, VOCAB_CHUNK]`` buffer in the input dtype (32 MiB for bf16) and a ``[ROW_CHUNK, H]`` fp32 accumulator
(16 MiB at H = 4096) are all that exists besides the outputs.

Forward, per row chunk and vocabulary chunk:
1. ``logits_tile_kernel``: logits tiles on the tensor cores, transformed in fp32; per tile, the max, the sum of
   exponentials and (for the entropy) ``sum exp * z``; the target's logit; and, when the gradient is stored,
   ``q = exp(z - tile_max) * dz/draw`` in the input dtype.
2. ``combine_tiles_kernel``: online log-sum-exp across tiles and chunks.
3. ``gemm_acc_kernel``: ``acc = alpha * acc + (q * exp(tile_max - running_max)) @ W_chunk``.
After the last chunk, ``d logprob / d hidden = c_t * W[target] - acc / sum_exp`` is written in the input dtype.

So when ``weight`` and ``bias`` are frozen (LoRA), forward + backward are two ``N x H x V`` products (the floor,
``4 N H V`` FLOPs): the backward only scales the stored gradient by the upstream one, in place. When ``weight`` or
``bias`` require grad, or the entropy receives a gradient, the backward recomputes the logits tile by tile
(``logits_tile_kernel`` with ``BACKWARD``) and runs ``gemm_acc_kernel`` for ``dhidden`` and ``dweight``.

Numerics: logits, log-sum-exp and entropy in fp32 (tensor-core products with fp32 accumulation; fp32 inputs use
``input_precision="ieee"``). The stored probabilities and the gradient are rounded once to the input dtype (bf16:
relative 2^-9 per element), which is what the bf16 tensor-core product needs anyway.

Inputs are assumed checked and flattened by ``longctx_kernels.functional.selective_logprobs``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from longctx_kernels.ops.triton import _kernels

try:  # host-side TMA descriptors (Triton >= 3.3); without them the kernels load through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


@dataclass(frozen=True)
class TileConfig:
    """Tile of ``logits_tile_kernel``: rows x vocabulary x hidden step, warps, pipeline stages."""

    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GemmConfig:
    """Tile of ``gemm_acc_kernel``: out rows x out columns x reduction step, warps, stages, L2 grouping."""

    block_m: int
    block_no: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int


# Defaults chosen by a tile sweep on Hopper GPUs. fp32 tiles are smaller: twice the bytes.
LOGITS_CONFIGS: dict[torch.dtype, TileConfig] = {
    torch.bfloat16: TileConfig(128, 128, 64, 8, 4),
    torch.float16: TileConfig(128, 128, 64, 8, 4),
    torch.float32: TileConfig(64, 128, 32, 8, 3),
}
# Tiles of a pass that stores no gradient (a no-grad pass, or one whose lm_head trains: its backward recomputes):
# without the stored probabilities, 256 x 128 tiles no longer spill and run fastest in the Hopper sweep.
FORWARD_CONFIGS: dict[torch.dtype, TileConfig] = {
    torch.bfloat16: TileConfig(256, 128, 64, 8, 3),
    torch.float16: TileConfig(256, 128, 64, 8, 3),
    torch.float32: TileConfig(64, 128, 32, 8, 3),
}
GEMM_CONFIGS: dict[torch.dtype, GemmConfig] = {
    torch.bfloat16: GemmConfig(128, 256, 64, 8, 3, 8),
    torch.float16: GemmConfig(128, 256, 64, 8, 3, 8),
    torch.float32: GemmConfig(64, 128, 32, 8, 3, 8),
}
ROW_CHUNK = 1024
VOCAB_CHUNK = 16384
# Tiles arrive by the bulk tensor copy engine (TMA) where the tensors allow it; LONGCTX_TRITON_TMA=0 turns it off.
USE_TMA = os.environ.get("LONGCTX_TRITON_TMA", "1") != "0"
# The vocabulary-reduction gemm scales A in registers after the load; in the Hopper sweep its pointer loads were as
# fast as TMA or faster, so TMA there is opt-in (LONGCTX_TRITON_GEMM_TMA=1).
GEMM_TMA = os.environ.get("LONGCTX_TRITON_GEMM_TMA", "0") == "1"
_COMBINE_ROWS = 16
_FINISH_COLS = 1024

# Last compiled handle of each kernel, for the resource report (registers, spills) of the benchmark.
_COMPILED: dict[str, object] = {}


def compiled_resources() -> dict[str, dict[str, int]]:
    """Registers, spills and shared memory of the last compiled launch of each kernel (GPU only).

    Returns:
        ``{kernel name: {"n_regs": ..., "n_spills": ..., "shared_bytes": ...}}``; empty under the interpreter.
    """
    report = {}
    for name, handle in _COMPILED.items():
        if handle is None or not hasattr(handle, "n_regs"):
            continue
        shared = getattr(getattr(handle, "metadata", None), "shared", -1)
        report[name] = {"n_regs": int(handle.n_regs), "n_spills": int(handle.n_spills), "shared_bytes": int(shared)}
    return report


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs unit stride in the last dimension and 16-byte aligned base and row strides."""
    if not USE_TMA or TensorDescriptor is None:
        return False
    return all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors
    )


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@dataclass(frozen=True)
class _Plan:
    """Tile sizes fitted to one call's shapes."""

    tile: TileConfig
    gemm: GemmConfig
    row_chunk: int
    vocab_chunk: int  # multiple of tile.block_v
    precision: str

    @staticmethod
    def make(n: int, h: int, v: int, dtype: torch.dtype, store_grad: bool = True) -> _Plan:
        t, g = (LOGITS_CONFIGS if store_grad else FORWARD_CONFIGS)[dtype], GEMM_CONFIGS[dtype]
        block_v = min(t.block_v, _pow2_at_least_16(v))
        tile = TileConfig(
            min(t.block_n, _pow2_at_least_16(n)),
            block_v,
            min(t.block_k, _pow2_at_least_16(h)),
            t.num_warps,
            t.num_stages,
        )
        row_chunk = min(ROW_CHUNK, n)
        # The gemm's reduction step must divide the logits tile: one rescale factor per (row, tile).
        gemm = GemmConfig(
            min(g.block_m, _pow2_at_least_16(row_chunk)),
            min(g.block_no, _pow2_at_least_16(h)),
            min(g.block_k, block_v),
            g.num_warps,
            g.num_stages,
            g.group_m,
        )
        vocab_chunk = min(max(VOCAB_CHUNK // block_v, 1), triton.cdiv(v, block_v)) * block_v
        return _Plan(tile, gemm, row_chunk, vocab_chunk, "ieee" if dtype == torch.float32 else "tf32")


@dataclass(frozen=True)
class _Transform:
    """Elementwise map raw logits -> softmax input: ``softcap * tanh(raw * pre_scale / softcap) / temperature``."""

    pre_scale: float  # logit_scale / logit_divisor
    softcap: float | None
    inv_temp: float

    @property
    def linear_factor(self) -> float:
        return self.pre_scale * self.inv_temp


def _gemm(plan, a, a_strides, b, b_strides, b_rows, out, m, no, k, *, a_scale=None, alpha=None, accumulate,
          tma=None):  # fmt: skip
    """``tma=(a [m, >= k] tensor, b parent tensor, first row of b in it)`` selects descriptor loads."""
    g = plan.gemm
    grid = (triton.cdiv(m, g.block_m) * triton.cdiv(no, g.block_no),)
    a_desc = b_desc = a
    b_row0 = 0
    if tma is not None:
        a_desc = TensorDescriptor.from_tensor(tma[0], [g.block_m, g.block_k])
        b_desc = TensorDescriptor.from_tensor(tma[1], [g.block_k, g.block_no])
        b_row0 = tma[2]
    _COMPILED["gemm_acc_kernel"] = _kernels.gemm_acc_kernel[grid](
        a,
        b,
        a_desc,
        b_desc,
        b_row0,
        out,
        a if a_scale is None else a_scale,
        out if alpha is None else alpha,
        m,
        no,
        k,
        b_rows,
        a_strides[0],
        a_strides[1],
        b_strides[0],
        b_strides[1],
        out.stride(0),
        out.stride(1),
        0 if a_scale is None else a_scale.stride(0),
        HAS_A_SCALE=a_scale is not None,
        HAS_ALPHA=alpha is not None,
        ACCUMULATE=accumulate,
        EVEN_K=k % g.block_k == 0,
        USE_TMA=tma is not None,
        SCALE_BLOCK=plan.tile.block_v,
        DOT_PRECISION=plan.precision,
        BLOCK_M=g.block_m,
        BLOCK_NO=g.block_no,
        BLOCK_K=g.block_k,
        GROUP_M=g.group_m,
        num_warps=g.num_warps,
        num_stages=g.num_stages,
    )


def _logits_tiles(plan, tf, hidden, weight, bias, targets, out, n, v0, vlen, *, stats=None, backward=None):
    """Launches ``logits_tile_kernel`` over ``n`` rows x vocabulary ``[v0, v0 + vlen)``."""
    t = plan.tile
    tiles = triton.cdiv(vlen, t.block_v)
    dummy = targets
    tmax, tsum, tent, zt, ct = stats if stats is not None else (dummy,) * 5
    lse, mean_z, g_lp, g_ent = backward if backward is not None else (dummy,) * 4
    with_ent = (stats is not None and tent is not None) or (backward is not None and g_ent is not None)
    grid = (triton.cdiv(n, t.block_n) * tiles,)
    use_tma = _tma_ok(hidden, weight)
    h_desc, w_desc = hidden, weight
    if use_tma:
        h_desc = TensorDescriptor.from_tensor(hidden, [t.block_n, t.block_k])
        w_desc = TensorDescriptor.from_tensor(weight, [t.block_v, t.block_k])
    _COMPILED["logits_tile_kernel" + ("_bwd" if backward is not None else "")] = _kernels.logits_tile_kernel[grid](
        hidden,
        weight,
        h_desc,
        w_desc,
        dummy if bias is None else bias,
        targets,
        dummy if out is None else out,
        tmax,
        tsum,
        dummy if tent is None else tent,
        zt,
        ct,
        lse,
        mean_z,
        g_lp,
        dummy if g_ent is None else g_ent,
        n,
        v0,
        vlen,
        weight.shape[0],
        hidden.shape[1],
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        0 if out is None else out.stride(0),
        0 if stats is None else tmax.stride(0),
        tf.pre_scale,
        1.0 if tf.softcap is None else tf.softcap,
        tf.inv_temp,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=tf.softcap is not None,
        BACKWARD=backward is not None,
        STORE_Q=out is not None,
        WITH_ENT=with_ent,
        EVEN_K=hidden.shape[1] % t.block_k == 0,
        USE_TMA=use_tma,
        DOT_PRECISION=plan.precision,
        BLOCK_N=t.block_n,
        BLOCK_V=t.block_v,
        BLOCK_K=t.block_k,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return tiles


def _forward(hidden, weight, bias, targets, tf: _Transform, with_entropy: bool, store_grad: bool):
    """Returns ``(logprobs, entropy | None, lse, mean_z | None, dlogprob/dhidden | None)``."""
    n_tok, hdim = hidden.shape
    vocab = weight.shape[0]
    plan = _Plan.make(n_tok, hdim, vocab, hidden.dtype, store_grad)
    f32 = {"device": hidden.device, "dtype": torch.float32}
    run_m = torch.full((n_tok,), -math.inf, **f32)
    run_s = torch.zeros(n_tok, **f32)
    run_e = torch.zeros(n_tok, **f32) if with_entropy else None
    zt = torch.empty(n_tok, **f32)
    ct = torch.full((n_tok,), tf.linear_factor, **f32)  # overwritten per row when softcap makes it vary
    rc, vc = plan.row_chunk, plan.vocab_chunk
    max_tiles = vc // plan.tile.block_v
    tstats = torch.empty(4 if with_entropy else 3, rc, max_tiles, **f32)
    alpha = torch.empty(rc, **f32)
    grad = q = acc = None
    if store_grad:
        grad = torch.empty(n_tok, hdim, device=hidden.device, dtype=hidden.dtype)
        q = torch.empty(rc, vc, device=hidden.device, dtype=hidden.dtype)
        acc = torch.empty(rc, hdim, **f32)
    for r0 in range(0, n_tok, rc):
        n = min(rc, n_tok - r0)
        h = hidden[r0 : r0 + n]
        rows = slice(r0, r0 + n)
        for ci, v0 in enumerate(range(0, vocab, vc)):
            vlen = min(vc, vocab - v0)
            stats = (tstats[0], tstats[1], tstats[3] if with_entropy else None, zt[rows], ct[rows])
            tiles = _logits_tiles(plan, tf, h, weight, bias, targets[rows], q, n, v0, vlen, stats=stats)
            _COMPILED["combine_tiles_kernel"] = _kernels.combine_tiles_kernel[(triton.cdiv(n, _COMBINE_ROWS),)](
                tstats[0],
                tstats[1],
                tstats[3] if with_entropy else tstats[1],
                tstats[2],
                run_m[rows],
                run_s[rows],
                run_e[rows] if with_entropy else run_s[rows],
                alpha,
                n,
                tiles,
                tstats.stride(1),
                WITH_ENT=with_entropy,
                BLOCK_R=_COMBINE_ROWS,
                BLOCK_T=triton.next_power_of_2(max_tiles),
            )
            if store_grad:
                k = tiles * plan.tile.block_v  # q's padded columns are zero
                tma = (q[:n], weight, v0) if GEMM_TMA and _tma_ok(q, weight) else None
                _gemm(plan, q, q.stride(), weight[v0:], weight.stride(), vlen, acc, n, hdim, k,
                      a_scale=tstats[2], alpha=alpha, accumulate=ci > 0, tma=tma)  # fmt: skip
        if store_grad:
            grid = (n, triton.cdiv(hdim, _FINISH_COLS))
            _COMPILED["finish_grad_kernel"] = _kernels.finish_grad_kernel[grid](
                acc, weight, targets[rows], ct[rows], run_s[rows], grad[rows], hdim,
                acc.stride(0), weight.stride(0), weight.stride(1), grad.stride(0), grad.stride(1),
                BLOCK_H=_FINISH_COLS,
            )  # fmt: skip
    lse = run_m + run_s.log()
    logprobs = zt - lse
    mean_z = entropy = None
    if with_entropy:
        mean_z = run_e / run_s
        entropy = lse - mean_z
    return logprobs, entropy, lse, mean_z, grad


def _backward_recompute(hidden, weight, bias, targets, tf, lse, mean_z, g_lp, g_ent, needs):
    """Gradients from recomputed logits tiles: ``(dhidden | None, dweight | None, dbias | None)``."""
    need_h, need_w, need_b = needs
    n_tok, hdim = hidden.shape
    vocab = weight.shape[0]
    plan = _Plan.make(n_tok, hdim, vocab, hidden.dtype)
    rc, vc = plan.row_chunk, plan.vocab_chunk
    dev = hidden.device
    if g_lp is None:
        g_lp = torch.zeros(n_tok, device=dev, dtype=torch.float32)
    g_lp = g_lp.float().contiguous()
    g_ent = None if g_ent is None else g_ent.float().contiguous()
    dz = torch.empty(rc, vc, device=dev, dtype=hidden.dtype)
    dh = torch.empty(n_tok, hdim, device=dev, dtype=hidden.dtype) if need_h else None
    dh_acc = torch.empty(rc, hdim, device=dev, dtype=torch.float32) if need_h else None
    # fp32 accumulators across row chunks: V x H x 4 bytes, the price of a trainable lm_head.
    dw_acc = torch.zeros(vocab, hdim, device=dev, dtype=torch.float32) if need_w else None
    db_acc = torch.zeros(vocab, device=dev, dtype=torch.float32) if need_b else None
    for r0 in range(0, n_tok, rc):
        n = min(rc, n_tok - r0)
        h = hidden[r0 : r0 + n]
        rows = slice(r0, r0 + n)
        for ci, v0 in enumerate(range(0, vocab, vc)):
            vlen = min(vc, vocab - v0)
            bwd = (lse[rows], mean_z[rows] if g_ent is not None else lse[rows], g_lp[rows],
                   None if g_ent is None else g_ent[rows])  # fmt: skip
            tiles = _logits_tiles(plan, tf, h, weight, bias, targets[rows], dz, n, v0, vlen, backward=bwd)
            k = tiles * plan.tile.block_v
            if need_h:
                tma = (dz[:n], weight, v0) if GEMM_TMA and _tma_ok(dz, weight) else None
                _gemm(plan, dz, dz.stride(), weight[v0:], weight.stride(), vlen, dh_acc, n, hdim, k,
                      accumulate=ci > 0, tma=tma)  # fmt: skip
            if need_w:
                # dW[v0 : v0 + vlen] += dz^T @ h: A is dz read transposed.
                _gemm(plan, dz, (1, dz.stride(0)), h, h.stride(), n, dw_acc[v0:], vlen, hdim, n, accumulate=True)
            if need_b:
                db_acc[v0 : v0 + vlen] += dz[:n, :vlen].float().sum(0)
        if need_h:
            dh[rows] = dh_acc[:n]
    dw = None if dw_acc is None else dw_acc.to(weight.dtype)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


class TritonSelectiveLogprobs(torch.autograd.Function):
    """Autograd wrapper: stored ``d logprob / d hidden`` for a frozen lm_head, recompute otherwise."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tf: _Transform, return_entropy: bool):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        store = need_h and not need_w and not need_b
        logprobs, entropy, lse, mean_z, grad = _forward(hidden, weight, bias, targets, tf, return_entropy, store)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mean_z, grad)
        ctx.tf = tf
        ctx.set_materialize_grads(False)
        if entropy is None:
            entropy = logprobs.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets, lse, mean_z, grad = ctx.saved_tensors
        if mean_z is None:
            g_ent = None
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None
        if grad is not None and g_ent is None:
            # In place: the stored gradient is needed once. A second backward through this graph
            # (retain_graph=True) fails autograd's version check on the saved tensor instead of going wrong.
            return grad.mul_(g_lp.unsqueeze(1)), None, None, None, None, None
        needs = ctx.needs_input_grad[:3]
        dh, dw, db = _backward_recompute(hidden, weight, bias, targets, ctx.tf, lse, mean_z, g_lp, g_ent, needs)
        return dh, dw, db, None, None, None


def selective_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    temperature: float,
    logit_scale: float | None,
    logit_divisor: float | None,
    softcap: float | None,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backend of ``longctx_kernels.selective_logprobs`` on flattened, checked inputs.

    Args:
        hidden: ``[N, H]`` bf16, fp16 or fp32 CUDA tensor, any strides.
        weight: ``[V, H]`` lm_head weight, same dtype and device.
        targets: ``[N]`` int64 token ids in ``[0, V)``.
        bias: Optional ``[V]`` lm_head bias.
        temperature: Divides the fp32 logits after the transforms below.
        logit_scale: Optional multiplier of the raw logits.
        logit_divisor: Optional divisor, after ``logit_scale``.
        softcap: Optional ``softcap * tanh(z / softcap)``, before the temperature.
        return_entropy: Also compute the entropy.

    Returns:
        ``(logprobs, entropy)``: float32 ``[N]`` each; ``entropy`` is None unless ``return_entropy``.
        Differentiable w.r.t. ``hidden``, and ``weight``/``bias`` when they require grad.

    Example:
        >>> h = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        >>> w = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16)
        >>> t = torch.randint(0, 1000, (8,), device="cuda")
        >>> lp, _ = selective_logprobs_triton(h, w, t, None, temperature=1.0, logit_scale=None,
        ...                                   logit_divisor=None, softcap=None, return_entropy=False)
    """
    pre_scale = 1.0 if logit_scale is None else float(logit_scale)
    if logit_divisor is not None:
        pre_scale /= float(logit_divisor)
    tf = _Transform(pre_scale, None if softcap is None else float(softcap), 1.0 / float(temperature))
    targets = targets.contiguous()
    if hidden.shape[0] == 0:
        logprobs = hidden.float().sum(-1) * 0.0
        return logprobs, (logprobs.detach().clone() if return_entropy else None)
    inputs_need_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and inputs_need_grad):
        logprobs, entropy, *_ = _forward(hidden, weight, bias, targets, tf, return_entropy, store_grad=False)
        return logprobs, entropy
    logprobs, entropy = TritonSelectiveLogprobs.apply(hidden, weight, bias, targets, tf, return_entropy)
    return logprobs, (entropy if return_entropy else None)
