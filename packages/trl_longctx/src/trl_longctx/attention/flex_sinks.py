"""Attention with learned sinks and sliding windows whose memory grows linearly with the sequence.

gpt-oss gives every head a learned sink logit `c` (transformers' `s_aux`, the attention module's `sinks`): one more
column of the softmax that takes probability mass and contributes no value. transformers 5.17 trains such models with
`eager` attention, which holds `[batch, heads, T, T]` scores per layer; its `flex_attention` folds the sink in too but
refuses sinks on CPU (so it cannot be checked there) and does the folding in the activations' dtype. Here torch's
flex attention runs over a `BlockMask` (causal, sliding window, padding: transformers' masking utilities build it
from the model's config) and the sink is folded into its output exactly, through the log-sum-exp it returns.

The sink, derived. For one query row with scores `s_j` over the keys its mask allows and values `v_j`, eager computes
`p_j = exp(s_j) / (Z + exp(c))` with `Z = sum_j exp(s_j)`, and outputs `sum_j p_j v_j`. Flex attention returns
`o = sum_j exp(s_j) v_j / Z` and `lse = log Z`. So

    sum_j p_j v_j = o * Z / (Z + exp(c)) = o / (1 + exp(c - lse)) = o * sigmoid(lse - c).

A row whose mask allows no key has `Z = 0`: flex returns `o = 0` and `lse = -inf`, `sigmoid(-inf) = 0`, and the
output is 0 as in eager (where the sink takes all the mass). The gradients follow by autograd: flex attention's
backward takes the gradient of `lse` (`d lse / d s_j` is the softmax without the sink), and
`d/dc sigmoid(lse - c)` never forms anything bigger than `[batch, heads, T]`.

Numerics: `lse` comes out of the kernel in float32 (float64 for float64 inputs) and the factor `sigmoid(lse - c)` is
computed in that dtype, then rounded once to the output's dtype for the product (a float32 product would hold a
float32 copy of the `[batch, heads, T, head_dim]` output per layer). `sigmoid` is evaluated stably for any
`lse - c`.

Memory: besides what flex attention saves (q, k, v, its output and `lse`, as SDPA's flash kernel does), the backward
keeps the factor twice (float32 from `sigmoid`, rounded for the product): `6 * heads` bytes per token in bf16
(`trl_longctx.memory.planner` counts it). Flex attention's kernels never form `[T, T]` scores when compiled; they
are compiled on CUDA. Elsewhere torch runs its unfused reference, which materializes the scores, and torch 2.13 has
no flex attention backward on CPU at all: this path trains on CUDA.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

__all__ = [
    "LONGCTX_FLEX",
    "FlexRecompileLimitError",
    "RECOMPILE_LIMIT",
    "flex_attention_forward",
    "register_flex_attention",
    "sink_flex_attention",
]

# The name this attention is registered under with transformers' `AttentionInterface` and `AttentionMaskInterface`
# (`config._attn_implementation`).
LONGCTX_FLEX = "longctx_flex"


# Graphs dynamo may compile for flex attention in one process. Each mix of mask function, dtype, grouped-query flag,
# grad mode and static-then-dynamic shapes is one (a gpt-oss run has about 8: sliding and full layers, scoring without
# grad and training with it); torch's default limit is 8, beyond which dynamo silently runs the function uncompiled,
# which materializes `[T, T]` scores per head and runs out of memory at long context.
RECOMPILE_LIMIT = 64


class FlexRecompileLimitError(RuntimeError):
    """Flex attention needed more compiled variants than `RECOMPILE_LIMIT` (it would run uncompiled, `O(T^2)`)."""


def compile_failing_loudly(fn, limit: int = RECOMPILE_LIMIT, **compile_kwargs):
    """`torch.compile(fn)` whose recompile limit is `limit` and whose hitting it raises `FlexRecompileLimitError`
    instead of running `fn` uncompiled. Both settings apply only while the returned function runs."""
    compiled = torch.compile(fn, **compile_kwargs)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
                return compiled(*args, **kwargs)
        except FailOnRecompileLimitHit as error:
            raise FlexRecompileLimitError(
                f"flex attention was compiled for {limit} variants in this process (masks, dtypes, shapes) and would "
                "now run uncompiled, materializing [T, T] scores per head. Turn it off with flex_attention=False, "
                f"or raise trl_longctx.attention.flex_sinks.RECOMPILE_LIMIT. ({error})"
            ) from error

    return run


@functools.cache
def _compiled_flex_attention():
    # One compiled wrapper for the process: dynamo caches a graph per variant (dynamic after the first new length).
    return compile_failing_loudly(flex_attention)


def _flex_kernel(device: torch.device):
    """The flex attention function for `device`: compiled (fused kernels) on CUDA; inside a region torch.compile is
    already tracing, the plain function (dynamo inlines it); elsewhere torch's unfused reference."""
    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    return _compiled_flex_attention()


def _softcap_score_mod(softcap: float):
    def score_mod(score, batch, head, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def sink_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask | None = None,
    sinks: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Flex attention over `block_mask`, with one learned sink logit per query head folded in (module docstring).

    Args:
        query: `[B, Hq, T, D]`.
        key, value: `[B, Hkv, S, D]` and `[B, Hkv, S, Dv]`, `Hq` a multiple of `Hkv` (grouped-query attention).
        block_mask: Which keys each query sees (`torch.nn.attention.flex_attention.BlockMask`, of `[T, S]`);
            `None`: every key.
        sinks: `[Hq]` sink logits (any float dtype, used in the `lse` dtype), or `None` for plain attention.
        scale: Factor of `q @ k^T`; `None`: `D ** -0.5`.
        softcap: Scores become `softcap * tanh(score / softcap)` before the softmax (Gemma 2); `None`: unchanged.
        kernel_options: Passed to flex attention (its Triton kernels' block sizes, stages, ...).

    Returns:
        `[B, Hq, T, Dv]` in the dtype of `query`.

    Example:
        >>> from torch.nn.attention.flex_attention import create_block_mask
        >>> q = k = v = torch.randn(1, 2, 47, 16)
        >>> causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, 47, 47, device="cpu")
        >>> sink_flex_attention(q, k, v, causal, torch.zeros(2)).shape
        torch.Size([1, 2, 47, 16])
    """
    kernel = _flex_kernel(query.device)
    options = {
        "score_mod": None if softcap is None else _softcap_score_mod(softcap),
        "block_mask": block_mask,
        "scale": scale,
        "enable_gqa": query.size(1) != key.size(1),
        "kernel_options": kernel_options,
    }
    if sinks is None:
        return kernel(query, key, value, **options)
    out, aux = kernel(query, key, value, **options, return_aux=AuxRequest(lse=True))
    factor = torch.sigmoid(aux.lse - sinks.to(aux.lse.dtype).view(1, -1, 1))  # [B, Hq, T]
    return out * factor.unsqueeze(-1).to(out.dtype)


def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockMask | torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (`AttentionInterface`) over `sink_flex_attention`.

    The mask comes from transformers' masking utilities, registered for `LONGCTX_FLEX` by `register_flex_attention`:
    a `BlockMask` per layer type, holding the causal rule, the sliding window of sliding layers (so the
    `sliding_window` keyword is not needed here) and the padding.

    Args:
        module: The attention module (its `is_causal` is checked when no mask comes).
        query, key, value: `[B, heads, T, head_dim]` as the model's attention module passes them.
        attention_mask: The `BlockMask`; `None` only for a non-causal module.
        scaling, softcap, s_aux: As `sink_flex_attention`'s `scale`, `softcap` and `sinks`; a `kernel_options`
            keyword is passed on too.
        dropout: Must be 0: flex attention has no dropout.

    Returns:
        `([B, T, heads, head_dim], None)`: no attention weights exist to return.

    Raises:
        ValueError: On attention dropout, a position bias, a mask that is not a `BlockMask`, or no mask for a causal
            module: the message names the setting.
    """
    if dropout:
        raise ValueError(
            f"attn_implementation={LONGCTX_FLEX!r} has no attention dropout, got dropout={dropout} (the model "
            "config's attention_dropout while training). Set attention_dropout=0.0, or flex_attention=False to keep "
            "the model's own attention."
        )
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"attn_implementation={LONGCTX_FLEX!r} does not take a position_bias.")
    if attention_mask is not None and not isinstance(attention_mask, BlockMask):
        raise ValueError(
            f"attn_implementation={LONGCTX_FLEX!r} needs the BlockMask transformers' masking utilities build for it "
            f"(register_flex_attention() registers them), got a {type(attention_mask).__name__}."
        )
    if attention_mask is None and getattr(module, "is_causal", True):
        raise ValueError(
            f"attn_implementation={LONGCTX_FLEX!r} got no attention mask for the causal {type(module).__name__}: "
            "without a BlockMask every query would see every key."
        )
    out = sink_flex_attention(
        query, key, value, attention_mask, s_aux, scale=scaling, softcap=softcap,
        kernel_options=kwargs.get("kernel_options"),
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register_flex_attention() -> str:
    """Register `flex_attention_forward` and transformers' flex block-mask builder under `LONGCTX_FLEX` (again is a
    no-op), so that `model.set_attn_implementation("longctx_flex")` or `from_pretrained(...,
    attn_implementation="longctx_flex")` runs it.

    Returns:
        `LONGCTX_FLEX`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(LONGCTX_FLEX, flex_attention_forward)
    AttentionMaskInterface.register(LONGCTX_FLEX, flex_attention_mask)
    return LONGCTX_FLEX
