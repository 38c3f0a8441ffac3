"""Plain, fully materialized reference of ``selective_logprobs`` (float64 by default).

It builds the whole ``[..., V]`` logits tensor, so it is for tests and benchmarks only: the chunked torch backend
and the Triton backend are both checked against it.
"""

from __future__ import annotations

import torch


def selective_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    logit_divisor: float | None = None,
    softcap: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` and entropies, computed naively in ``dtype``.

    Inputs are upcast to ``dtype`` before the matmul, so with the default float64 this is the "exact" answer for
    the given (possibly bf16) inputs. The transform order matches ``longctx_kernels.selective_logprobs``:
    ``z = hidden @ weight.T + bias``, ``z *= logit_scale``, ``z /= logit_divisor``,
    ``z = softcap * tanh(z / softcap)``, ``z /= temperature``. It is differentiable with respect to every
    floating input.

    Args:
        hidden: ``[..., H]`` floating tensor.
        weight: ``[V, H]`` floating tensor.
        targets: ``[...]`` integer tensor with values in ``[0, V)``.
        bias: Optional ``[V]`` floating tensor.
        temperature: Divides the processed logits (after the upcast).
        logit_scale: Optional multiplier of the logits.
        logit_divisor: Optional divisor of the logits (applied after ``logit_scale``).
        softcap: Optional tanh soft-capping value.
        dtype: Computation and output dtype.

    Returns:
        ``(logprobs, entropy)``, both ``[...]`` in ``dtype``.

    Example:
        >>> h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
        >>> lp, ent = selective_logprobs_reference(h, w, torch.randint(0, 11, (2, 5)))
        >>> lp.shape, lp.dtype
        (torch.Size([2, 5]), torch.float64)
    """
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if logit_scale is not None:
        z = z * logit_scale
    if logit_divisor is not None:
        z = z / logit_divisor
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logprobs = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy
