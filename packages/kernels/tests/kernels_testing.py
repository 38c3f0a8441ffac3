"""Test helpers: input factories, the naive same-dtype baseline and verbose closeness checks.

Shared by the torch and Triton backend tests; the float64 reference itself is public
(``longctx_kernels.selective_logprobs_reference``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from longctx_kernels import selective_logprobs_reference


def _worst(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, tuple[int, ...]]:
    """Max abs error, max rel error and the index of the max abs error."""
    diff = (actual.double() - expected.double()).abs()
    if diff.numel() == 0:
        return 0.0, 0.0, ()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    rel = (diff / expected.double().abs().clamp_min(1e-12)).max().item()
    return diff.max().item(), rel, index


def assert_verbose_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor"
) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` everywhere; on failure says where and by how much."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    if bad.any():
        max_abs, max_rel, index = _worst(actual, expected)
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements outside atol={atol}, rtol={rtol}; "
            f"max abs err {max_abs:.3e} at {index} (actual {actual[index].item():.6g}, "
            f"expected {expected[index].item():.6g}); max rel err {max_rel:.3e}; first bad index {first}"
        )


def assert_error_within(
    actual: torch.Tensor,
    baseline: torch.Tensor,
    expected: torch.Tensor,
    *,
    factor: float,
    slack: float,
    name: str = "tensor",
) -> None:
    """Low-precision rule: ``max|actual - expected| <= factor * max|baseline - expected| + slack``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, rel, index = _worst(actual, expected)
    base_err, _, base_index = _worst(baseline, expected)
    bound = factor * base_err + slack
    assert err <= bound, (
        f"{name}: max abs err {err:.3e} at {index} (max rel {rel:.3e}) exceeds {factor} x naive err "
        f"{base_err:.3e} (at {base_index}) + {slack} = {bound:.3e}"
    )


def make_inputs(
    lead_shape: Sequence[int],
    hidden_size: int,
    vocab_size: int,
    dtype: torch.dtype,
    *,
    bias: bool = False,
    weight_requires_grad: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor | None]:
    """Random leaf tensors; logits come out with a standard deviation of about 3 so softmax is not flat."""
    hidden = torch.randn(*lead_shape, hidden_size, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, device=device) * (3.0 / hidden_size**0.5)).to(dtype)
    weight.requires_grad_(weight_requires_grad)
    bias_t = torch.randn(vocab_size, device=device).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab_size, tuple(lead_shape), device=device)
    return {"hidden": hidden, "weight": weight, "targets": targets, "bias": bias_t}


def naive_same_dtype(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    logit_divisor: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What stock code does: logits materialized in the input dtype, then an fp32 log-softmax."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if logit_scale is not None:
        z = z * logit_scale
    if logit_divisor is not None:
        z = z / logit_divisor
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp_all = torch.log_softmax(z.float() / temperature, dim=-1)
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logprobs, -(logp_all.exp() * logp_all).sum(-1)


def outputs_and_grads(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inputs: dict[str, torch.Tensor | None],
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    **options,
) -> dict[str, torch.Tensor | None]:
    """Runs ``fn(hidden, weight, targets, bias=..., **options) -> (logprobs, entropy)`` and backprops
    ``sum(grad_logprobs * logprobs) + sum(grad_entropy * entropy)`` to every input that requires grad."""
    logprobs, entropy = fn(inputs["hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"], **options)
    loss = 0.0
    if grad_logprobs is not None:
        loss = loss + (logprobs.double() * grad_logprobs.double()).sum()
    if grad_entropy is not None:
        loss = loss + (entropy.double() * grad_entropy.double()).sum()
    names = [k for k in ("hidden", "weight", "bias") if inputs[k] is not None and inputs[k].requires_grad]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    result: dict[str, torch.Tensor | None] = {"logprobs": logprobs.detach(), "entropy": entropy.detach()}
    result.update({f"grad_{k}": None for k in ("hidden", "weight", "bias")})
    result.update({f"grad_{k}": g for k, g in zip(names, grads)})
    return result


def reference_outputs_and_grads(inputs, grad_logprobs, grad_entropy, **options) -> dict[str, torch.Tensor | None]:
    """``outputs_and_grads`` of the float64 reference."""
    return outputs_and_grads(selective_logprobs_reference, inputs, grad_logprobs, grad_entropy, **options)
