"""Triton kernels of the fused lm_head + selective log-softmax.

Three kernels, launched per chunk of tokens (rows) and vocabulary (columns) by ``selective_logprobs.py``:

- ``logits_tile_kernel``: one ``[BLOCK_N, BLOCK_V]`` tile of ``hidden @ weight.T`` on the tensor cores (fp32
  accumulation), the logit transform (bias, scale, softcap, temperature) in fp32, then either the forward
  epilogue (per-tile max, sum of exponentials, entropy partial, target logit, and the unnormalized
  ``exp(z - tile_max) * dz/draw`` written in the input dtype) or the backward epilogue (``dL/draw`` from the saved
  log-sum-exp and the upstream gradients).
- ``combine_tiles_kernel``: folds one vocabulary chunk's tile statistics into the running per-row log-sum-exp
  state (flash-attention style), giving each tile its rescale factor ``exp(tile_max - running_max)``.
- ``gemm_acc_kernel``: ``out = alpha * out + (A * a_scale) @ B`` with fp32 accumulation; ``a_scale`` applies the
  per-(row, tile) rescale while loading A, so the probabilities never make an extra trip through memory.
- ``finish_grad_kernel``: ``grad_h = c_t * W[target] - acc / sum_exp`` per row, cast to the input dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh from exp: saturates cleanly to +-1 (exp overflow gives 2/inf = 0) and needs no libdevice.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def logits_tile_kernel(
    h_ptr,
    w_ptr,
    h_desc,  # TMA descriptors of hidden [n, H] (block BLOCK_N x BLOCK_K) and weight [V, H] (BLOCK_V x BLOCK_K)
    w_desc,
    b_ptr,
    tgt_ptr,
    out_ptr,  # forward: q = exp(z - tile_max) * c; backward: dL/draw. [rows, >= tiles * BLOCK_V], input dtype.
    tmax_ptr,  # forward: [rows, tiles] fp32 tile max / sum exp / sum exp * z
    tsum_ptr,
    tent_ptr,
    zt_ptr,  # forward: [rows] fp32 target logit and its chain factor c (written by the tile holding the target)
    ct_ptr,
    lse_ptr,  # backward: [rows] fp32 log-sum-exp, mean logit sum(p z), upstream grads of logprob and entropy
    ez_ptr,
    glp_ptr,
    gent_ptr,
    n_rows,
    v_start,
    v_len,
    vocab,
    hdim,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_on,
    stride_tn,
    pre_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BACKWARD: tl.constexpr,
    STORE_Q: tl.constexpr,
    WITH_ENT: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(n_rows, BLOCK_N)
    # Row tiles vary fastest: programs that run together share one weight tile, read once from HBM.
    pid_n = pid % num_n
    pid_v = pid // num_n
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < v_len
    vcols = v_start + cols
    # Out-of-range rows/columns read a valid row instead of masking every load; their results are discarded.
    rows_ld = rows % n_rows
    vcols_ld = v_start + cols % v_len
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows_ld[:, None] * stride_hn + ks[None, :] * stride_hk
    w_ptrs = w_ptr + vcols_ld[None, :] * stride_wv + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(hdim, BLOCK_K)):
        if USE_TMA:  # bulk tensor copies; out-of-bounds rows and columns arrive as zeros
            a = h_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            b = w_desc.load([v_start + pid_v * BLOCK_V, k * BLOCK_K]).T
        elif EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = ks < hdim - k * BLOCK_K
            a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk

    z = acc
    if HAS_BIAS:
        z += tl.load(b_ptr + vcols_ld).to(tl.float32)[None, :]
    z = z * pre_scale
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
        c = (1.0 - t * t) * (pre_scale * inv_temp)  # d(final logit) / d(raw logit)
    else:
        c = pre_scale * inv_temp
    z = z * inv_temp
    z_m = tl.where(col_ok[None, :], z, float("-inf"))
    tgt = tl.load(tgt_ptr + rows_ld)
    is_t = (vcols[None, :] == tgt[:, None]) & col_ok[None, :]

    if BACKWARD:
        lse = tl.load(lse_ptr + rows_ld)
        glp = tl.load(glp_ptr + rows_ld)
        p = tl.exp(z_m - lse[:, None])
        d = glp[:, None] * (tl.where(is_t, 1.0, 0.0) - p)
        if WITH_ENT:
            mean_z = tl.load(ez_ptr + rows_ld)
            gent = tl.load(gent_ptr + rows_ld)
            d -= gent[:, None] * p * (z - mean_z[:, None])  # d entropy / dz_v = -p_v (z_v - sum p z)
        d = d * c
        o_ptrs = out_ptr + rows[:, None] * stride_on + cols[None, :]
        tl.store(o_ptrs, d.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        m = tl.max(z_m, 1)
        e = tl.exp(z_m - m[:, None])  # 0 in padded columns
        t_off = rows * stride_tn + pid_v
        tl.store(tmax_ptr + t_off, m, mask=row_ok)
        tl.store(tsum_ptr + t_off, tl.sum(e, 1), mask=row_ok)
        if WITH_ENT:
            tl.store(tent_ptr + t_off, tl.sum(e * tl.where(col_ok[None, :], z, 0.0), 1), mask=row_ok)
        lo = v_start + pid_v * BLOCK_V
        has_t = row_ok & (tgt >= lo) & (tgt < v_start + v_len) & (tgt < lo + BLOCK_V)
        tl.store(zt_ptr + rows, tl.sum(tl.where(is_t, z, 0.0), 1), mask=has_t)
        if HAS_SOFTCAP:
            tl.store(ct_ptr + rows, tl.sum(tl.where(is_t, c, 0.0), 1), mask=has_t)
        if STORE_Q:
            o_ptrs = out_ptr + rows[:, None] * stride_on + cols[None, :]
            tl.store(o_ptrs, (e * c).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def combine_tiles_kernel(
    tmax_ptr,
    tsum_ptr,
    tent_ptr,
    tscale_ptr,
    run_m_ptr,
    run_s_ptr,
    run_e_ptr,
    alpha_ptr,
    n_rows,
    n_tiles,
    stride_tn,
    WITH_ENT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tiles = tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (tiles < n_tiles)[None, :]
    offs = rows[:, None] * stride_tn + tiles[None, :]
    tm = tl.load(tmax_ptr + offs, mask=mask, other=float("-inf"))
    old_m = tl.load(run_m_ptr + rows, mask=row_ok, other=0.0)
    new_m = tl.maximum(old_m, tl.max(tm, 1))
    alpha = tl.exp(old_m - new_m)  # 0 on the first chunk (old_m = -inf)
    scale = tl.exp(tm - new_m[:, None])
    tl.store(tscale_ptr + offs, scale, mask=mask)
    ts = tl.load(tsum_ptr + offs, mask=mask, other=0.0)
    old_s = tl.load(run_s_ptr + rows, mask=row_ok, other=0.0)
    tl.store(run_s_ptr + rows, alpha * old_s + tl.sum(ts * scale, 1), mask=row_ok)
    if WITH_ENT:
        te = tl.load(tent_ptr + offs, mask=mask, other=0.0)
        old_e = tl.load(run_e_ptr + rows, mask=row_ok, other=0.0)
        tl.store(run_e_ptr + rows, alpha * old_e + tl.sum(te * scale, 1), mask=row_ok)
    tl.store(run_m_ptr + rows, new_m, mask=row_ok)
    tl.store(alpha_ptr + rows, alpha, mask=row_ok)


@triton.jit
def gemm_acc_kernel(
    a_ptr,
    b_ptr,
    a_desc,  # TMA descriptors of A [M, K] (BLOCK_M x BLOCK_K) and of B's parent [rows, NO] (BLOCK_K x BLOCK_NO)
    b_desc,
    b_row0,  # B = parent rows [b_row0, b_row0 + K) in the descriptor path
    out_ptr,
    a_scale_ptr,
    alpha_ptr,
    M,
    NO,
    K,
    b_rows,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    stride_sm,
    HAS_A_SCALE: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_NO: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out[M, NO] = (alpha[:, None] *) out + (A * a_scale) @ B``; fp32 ``out``; B rows >= ``b_rows`` are clamped
    (their A columns are zero)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(NO, BLOCK_NO)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_NO + tl.arange(0, BLOCK_NO)
    rm_ld = rm % M
    rn_ld = rn % NO
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_NO), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + ks
        a_ptrs = a_ptr + rm_ld[:, None] * stride_am + kk[None, :] * stride_ak
        b_ptrs = b_ptr + tl.minimum(kk, b_rows - 1)[:, None] * stride_bk + rn_ld[None, :] * stride_bn
        if USE_TMA:
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = b_desc.load([b_row0 + k * BLOCK_K, pid_n * BLOCK_NO])
        elif EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(kk < K)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(kk < K)[:, None], other=0.0)
        if HAS_A_SCALE:
            s = tl.load(a_scale_ptr + rm_ld * stride_sm + (k * BLOCK_K) // SCALE_BLOCK)
            a = (a.to(tl.float32) * s[:, None]).to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    o_mask = (rm < M)[:, None] & (rn < NO)[None, :]
    if ACCUMULATE:
        old = tl.load(o_ptrs, mask=o_mask, other=0.0)
        if HAS_ALPHA:
            old = old * tl.load(alpha_ptr + rm_ld)[:, None]
        acc += old
    tl.store(o_ptrs, acc, mask=o_mask)


@triton.jit
def finish_grad_kernel(
    acc_ptr,
    w_ptr,
    tgt_ptr,
    ct_ptr,
    run_s_ptr,
    grad_ptr,
    hdim,
    stride_am,
    stride_wv,
    stride_wk,
    stride_gm,
    stride_gk,
    BLOCK_H: tl.constexpr,
):
    """``grad[r] = c_t * W[target] - acc[r] / sum_exp``: d logprob / d hidden, before the upstream gradient."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < hdim
    tgt = tl.load(tgt_ptr + row)
    ct = tl.load(ct_ptr + row)
    inv_s = 1.0 / tl.load(run_s_ptr + row)
    w_t = tl.load(w_ptr + tgt * stride_wv + cols * stride_wk, mask=ok, other=0.0).to(tl.float32)
    acc = tl.load(acc_ptr + row * stride_am + cols, mask=ok, other=0.0)
    g = ct * w_t - acc * inv_s
    tl.store(grad_ptr + row * stride_gm + cols * stride_gk, g.to(grad_ptr.dtype.element_ty), mask=ok)
