"""`trl_longctx.attention.flex_attention_forward` against transformers' eager attention: outputs and gradients (q, k,
v, sinks), sliding-window and full layers, odd lengths, left- and right-padded batches (GRPO's prompts are left-padded,
its completions right-padded), grouped-query heads.

The reference is gpt-oss's own `eager_attention_forward` in float64 on the same inputs, with transformers' eager mask;
ours gets the same mask function as a `BlockMask`. torch 2.13 refuses flex attention's backward on CPU with one check,
which the tests lift (`testing_utils.flex_backward_on_cpu`): behind it the uncompiled reference of the same op runs.
"""

import pytest
import torch
from testing_utils import assert_close, flex_backward_on_cpu
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    eager_mask,
    padding_mask_function,
    sliding_window_causal_mask_function,
)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

from trl_longctx.attention import flex_attention_forward, sink_flex_attention

# Ours in the row's dtype against the float64 eager reference on the same inputs: `(atol, rtol)`. float64 and float32
# are the style guide's rows (float64: rounding of the same sums in another order). bf16 follows the relative rule
# instead: our error at most twice eager bf16's error (against the same reference) plus `BF16_SLACK`, plus one bf16
# spacing at the reference's largest magnitude (`bf16_spacing`): a bf16 result can sit that far from the float64
# value however it is computed. The sink gradient (one value per head, summed over batch and positions: |ds| ~ 2-7
# here) is where this matters: its spacing is 0.016-0.031, so eager bf16 may land on the nearest value by chance
# (seen: eager 0.0035, ours 0.0317 = one spacing at |ds| ~ 4.6) while ours, rounded once more, lands one away.
TOLERANCES = {
    torch.float64: {"out": (1e-12, 1e-10), "grads": (1e-11, 1e-9)},
    torch.float32: {"out": (1e-5, 1e-4), "grads": (1e-5, 1e-3)},
}
BF16_SLACK = {"out": 1e-3, "grads": 1e-2}
# Gemma 2's eager reference takes its softmax in float32 whatever the input dtype, so it is a float32 reference.
SOFTCAP_TOLERANCE = {"out": (1e-6, 1e-5), "grads": (1e-5, 1e-4)}

BATCH, HEADS, KV_HEADS, HEAD_DIM = 3, 4, 2, 16
# Sink logits across the range a trained model shows: a head whose sink takes almost everything, one nearly unused.
SINKS = (-4.0, 0.0, 2.5, 9.0)
# (layer, T, sliding window): odd lengths, one beyond flex attention's 128-token blocks; gpt-oss's own window of 128.
LAYERS = [("sliding", 47, 16), ("full", 47, None), ("sliding", 130, 128), ("full", 130, None), ("sliding", 130, 33)]


def padding(length: int, device="cpu") -> torch.Tensor:
    """`[3, T]` bool: row 0 unpadded, row 1 left-padded (5), row 2 left- (17) and right-padded (4)."""
    mask = torch.ones(BATCH, length, dtype=torch.bool, device=device)
    mask[1, :5] = False
    mask[2, :17] = False
    mask[2, -4:] = False
    return mask


def mask_function(window):
    return causal_mask_function if window is None else sliding_window_causal_mask_function(window)


def masks(length: int, window, dtype, device="cpu"):
    """transformers' eager mask `[B, 1, T, T]` and the same mask function as a `BlockMask`."""
    pad = padding(length, device)
    eager = eager_mask(BATCH, length, length, mask_function=mask_function(window), attention_mask=pad, dtype=dtype,
                       device=device)  # fmt: skip
    rule = and_masks(mask_function(window), padding_mask_function(pad))
    block = create_block_mask(rule, BATCH, None, length, length, device=device, _compile=False)
    return eager, block


class Attention(nn.Module):
    """What the eager functions read from the attention module."""

    def __init__(self, sinks: torch.Tensor | None):
        super().__init__()
        self.num_key_value_groups = HEADS // KV_HEADS
        self.head_dim = HEAD_DIM
        self.is_causal = True
        self.sinks = None if sinks is None else nn.Parameter(sinks)


def inputs(length: int, with_sinks: bool = True, device="cpu"):
    """float64 q `[B, Hq, T, D]`, k, v `[B, Hkv, T, D]`, sinks `[Hq]` and the output gradient `[B, T, Hq, D]`."""
    q = torch.randn(BATCH, HEADS, length, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(BATCH, KV_HEADS, length, HEAD_DIM, dtype=torch.float64)
    v = torch.randn(BATCH, KV_HEADS, length, HEAD_DIM, dtype=torch.float64)
    sinks = torch.tensor(SINKS, dtype=torch.float64) if with_sinks else None
    grad_out = torch.randn(BATCH, length, HEADS, HEAD_DIM, dtype=torch.float64)
    return tuple(None if t is None else t.to(device) for t in (q, k, v, sinks, grad_out))


def output_and_grads(attention, dtype, q, k, v, sinks, grad_out, **options):
    """`attention(module, q, k, v, ...)` in `dtype`, and the gradients of `<output, grad_out>`, as float64."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    module = Attention(None if sinks is None else sinks.to(dtype))
    with flex_backward_on_cpu():
        out, _ = attention(module, *leaves, scaling=HEAD_DIM**-0.5, s_aux=module.sinks, **options)
        wrt = leaves + ([] if sinks is None else [module.sinks])
        grads = torch.autograd.grad((out * grad_out.to(dtype)).sum(), wrt)
    return out.double(), [g.double() for g in grads]


def bf16_spacing(reference: torch.Tensor) -> float:
    """The distance between neighbouring bf16 values at the largest magnitude in `reference` (one unit in the last
    place there)."""
    largest = reference.abs().max().item()
    if largest == 0:
        return 0.0
    return torch.finfo(torch.bfloat16).eps * 2.0 ** torch.tensor(largest).log2().floor().item()


def check(ours, reference, tolerances, what):
    atol, rtol = tolerances["out"]
    assert_close(ours[0], reference[0], f"{what}: output", atol=atol, rtol=rtol)
    atol, rtol = tolerances["grads"]
    for name, mine, theirs in zip("qkvs"[: len(ours[1])], ours[1], reference[1], strict=True):
        assert_close(mine, theirs, f"{what}: grad of {name}", atol=atol, rtol=rtol)


def compare_with_gpt_oss_eager(layer, length, window, dtype, device="cpu"):
    """Ours in `dtype` against gpt-oss's eager attention in float64 (and, for bf16, eager in bf16), on `device`."""
    q, k, v, sinks, grad_out = inputs(length, device=device)
    eager, block = masks(length, window, torch.float64, device)
    reference = output_and_grads(gpt_oss_eager, torch.float64, q, k, v, sinks, grad_out, attention_mask=eager)
    ours = output_and_grads(flex_attention_forward, dtype, q, k, v, sinks, grad_out, attention_mask=block)
    what = f"{layer} T={length} {dtype} on {device}"
    if dtype != torch.bfloat16:
        check(ours, reference, TOLERANCES[dtype], what)
        return
    low, _ = masks(length, window, dtype, device)
    naive = output_and_grads(gpt_oss_eager, dtype, q, k, v, sinks, grad_out, attention_mask=low)
    for kind, mine, theirs, base in (
        ("out", [ours[0]], [naive[0]], [reference[0]]),
        ("grads", ours[1], naive[1], reference[1]),
    ):
        for name, m, n, r in zip("qkvs", mine, theirs, base, strict=False):
            error, naive_error = (m - r).abs().max().item(), (n - r).abs().max().item()
            bound = 2 * naive_error + BF16_SLACK[kind] + bf16_spacing(r)
            assert error <= bound, (
                f"{what} {kind} {name}: {error:.3g} vs eager bf16 {naive_error:.3g} (bound {bound:.3g})"
            )


@pytest.mark.parametrize(("layer", "length", "window"), LAYERS, ids=[f"{a}-T{t}-w{w}" for a, t, w in LAYERS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_sinks_match_gpt_oss_eager(layer, length, window, dtype):
    compare_with_gpt_oss_eager(layer, length, window, dtype)


def test_sinks_reach_the_output_and_their_gradient():
    # A sink that takes almost all the mass scales its head's output down; a very negative one leaves plain attention.
    q, k, v, _, _ = inputs(47)
    _, block = masks(47, None, torch.float64)
    plain = sink_flex_attention(q, k, v, block)
    low = sink_flex_attention(q, k, v, block, torch.full((HEADS,), -60.0, dtype=torch.float64))
    high = sink_flex_attention(q, k, v, block, torch.full((HEADS,), 60.0, dtype=torch.float64))
    assert_close(low, plain, "sinks at -60 vs no sinks", atol=1e-20, rtol=1e-15)
    assert high.abs().max() < 1e-20 and plain.abs().max() > 0.1


def test_fully_masked_rows_are_zero_with_finite_gradients():
    # Left padding: in a sliding layer the first tokens of a padded row see no key at all (flex: lse = -inf).
    q, k, v, sinks, grad_out = inputs(47)
    _, block = masks(47, 16, torch.float64)
    out, grads = output_and_grads(
        flex_attention_forward, torch.float64, q, k, v, sinks, grad_out, attention_mask=block
    )
    assert (out[1, :5] == 0).all() and (out[2, :17] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("window", [None, 16], ids=["full", "sliding"])
def test_without_sinks_matches_eager(window):
    # Models with sliding windows and no sinks: gpt-oss's eager attention with sinks at -inf is plain attention.
    # Eager then spreads a row that sees no key evenly over the masked keys, flex gives it 0: such rows (padding,
    # which no real token reads) are left out of the comparison.
    q, k, v, _, grad_out = inputs(47, with_sinks=False)
    eager, block = masks(47, window, torch.float64)
    sees_a_key = (eager[:, 0] == 0).any(-1)  # [B, T]
    grad_out = grad_out * sees_a_key[..., None, None]
    no_sink = torch.full((HEADS,), -torch.inf, dtype=torch.float64)
    reference = output_and_grads(gpt_oss_eager, torch.float64, q, k, v, no_sink, grad_out, attention_mask=eager)
    ours = output_and_grads(flex_attention_forward, torch.float64, q, k, v, None, grad_out, attention_mask=block)
    ours, reference = (ours[0][sees_a_key], ours[1]), (reference[0][sees_a_key], reference[1][:3])
    check(ours, reference, TOLERANCES[torch.float64], "no sinks")


def test_softcap_matches_gemma2_eager():
    # Gemma 2's eager softmax runs in float32: its mask must be float32's (float64's minimum is -inf there). Rows that
    # see no key are left out as in `test_without_sinks_matches_eager`.
    q, k, v, _, grad_out = inputs(47, with_sinks=False)
    q = q * 8  # scores well into tanh's bend
    eager, block = masks(47, 16, torch.float32)
    sees_a_key = (eager[:, 0] == 0).any(-1)
    grad_out = grad_out * sees_a_key[..., None, None]
    options = {"softcap": 5.0}
    reference = output_and_grads(gemma2_eager, torch.float64, q, k, v, None, grad_out, attention_mask=eager, **options)
    ours = output_and_grads(flex_attention_forward, torch.float64, q, k, v, None, grad_out, attention_mask=block,
                            **options)  # fmt: skip
    check((ours[0][sees_a_key], ours[1]), (reference[0][sees_a_key], reference[1]), SOFTCAP_TOLERANCE, "softcap")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dropout": 0.1}, r"has no attention dropout, got dropout=0.1 .*attention_dropout=0.0, or flex_attention"),
        ({"attention_mask": "tensor"}, r"needs the BlockMask .* got a Tensor"),
        ({"attention_mask": None}, r"got no attention mask for the causal Attention"),
        ({"position_bias": torch.zeros(1)}, r"does not take a position_bias"),
    ],
)
def test_refuses_what_it_cannot_compute(change, message):
    q, k, v, sinks, _ = inputs(8)
    eager, block = masks(8, None, torch.float64)
    options = {"attention_mask": block, **change}
    if options["attention_mask"] == "tensor":
        options["attention_mask"] = eager
    with pytest.raises(ValueError, match=message):
        flex_attention_forward(Attention(sinks), q, k, v, s_aux=sinks, **options)


def test_bf16_spacing_is_the_gap_to_the_next_bf16_value():
    for value in (4.625, 1.581, 0.07, 300.0):
        reference = torch.tensor([value, -value / 3], dtype=torch.float64)
        here = torch.tensor(value, dtype=torch.bfloat16)
        above = torch.nextafter(here, torch.tensor(torch.inf, dtype=torch.bfloat16))
        assert bf16_spacing(reference) == (above - here).item(), value
    assert bf16_spacing(torch.zeros(3)) == 0.0
