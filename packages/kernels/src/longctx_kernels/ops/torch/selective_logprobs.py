"""Chunked torch backend of ``selective_logprobs``: fused lm_head + log-softmax gather (+ entropy).

Stock code builds ``[N, V]`` logits (plus their fp32 log-softmax and gradients) for ``N`` tokens; at
``N = 32K`` and ``V = 152K`` one fp32 copy alone is 18.5 GiB. Here the tokens are cut into chunks of ``C`` rows,
so the forward and the backward each hold only ``[C, V]`` buffers (a few of them, fp32) at a time. The backward
recomputes each chunk's logits from ``hidden`` and ``weight`` instead of saving them: one extra matmul per chunk
buys ``N * V * 4`` bytes.

Inputs are assumed already checked by ``longctx_kernels.functional.selective_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from longctx_kernels.chunking import default_chunk_size


@dataclass(frozen=True)
class _LogitTransform:
    """The elementwise map from raw ``hidden @ weight.T (+ bias)`` to the logits fed to the softmax."""

    temperature: float
    logit_scale: float | None
    logit_divisor: float | None
    softcap: float | None

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """Transforms fp32 raw logits in place, in the model's order, temperature last."""
        if self.logit_scale is not None:
            z.mul_(self.logit_scale)
        if self.logit_divisor is not None:
            z.div_(self.logit_divisor)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z.div_(self.temperature)

    @property
    def linear_factor(self) -> float:
        """d(final logits)/d(raw logits) without softcap: scale / divisor / temperature."""
        factor = 1.0 / self.temperature
        if self.logit_scale is not None:
            factor *= self.logit_scale
        if self.logit_divisor is not None:
            factor /= self.logit_divisor
        return factor

    def softcap_grad(self, z: torch.Tensor) -> torch.Tensor:
        """``1 - tanh^2`` of the softcap, recovered from the final logits (``tanh = z * T / softcap``)."""
        assert self.softcap is not None
        return (z * (self.temperature / self.softcap)).square_().neg_().add_(1.0)


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: _LogitTransform
) -> torch.Tensor:
    """``[C, H] -> [C, V]`` fp32 final logits of one chunk."""
    # The GEMM runs in the input dtype (it accumulates in fp32 internally); the one upcast right after means a
    # bf16 [C, V] buffer lives only until the fp32 one exists. For fp32 inputs .float() is a no-op and the
    # transforms below reuse the GEMM output in place.
    raw = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    return transform.apply_(raw.float())


class ChunkedSelectiveLogprobs(torch.autograd.Function):
    """Autograd function of the torch backend; saves no ``[N, V]`` tensor for the backward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        transform: _LogitTransform,
        return_entropy: bool,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n_tokens = hidden.shape[0]
        device = hidden.device
        logprobs = torch.empty(n_tokens, dtype=torch.float32, device=device)
        lse = torch.empty(n_tokens, dtype=torch.float32, device=device)
        entropy = torch.empty(n_tokens, dtype=torch.float32, device=device) if return_entropy else None
        for start in range(0, n_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], weight, bias, transform)
            chunk_lse = torch.logsumexp(z, dim=-1)
            # log p = z - lse, in place. Entropy as -sum(p * log p) rather than lse - sum(p * z): log p is small
            # near the mode, so it avoids cancelling two large fp32 numbers when the logits are large.
            logp = z.sub_(chunk_lse.unsqueeze(1))
            logprobs[rows] = logp.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
            lse[rows] = chunk_lse
            if entropy is not None:
                entropy[rows] = logp.exp().mul_(logp).sum(-1).neg_()
            del z, logp
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.transform = transform
        ctx.chunk_size = chunk_size
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        # Weight and bias gradients sum over every chunk: accumulate them in fp32 so that bf16/fp16 rounding
        # does not grow with the number of chunks (costs V * H * 4 bytes while the backward runs).
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            grad_z = _chunk_grad_logits(
                hidden[rows],
                weight,
                bias,
                targets[rows],
                lse[rows],
                None if entropy is None else entropy[rows],
                None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                ctx.transform,
            )
            if need_hidden:
                grad_hidden[rows] = grad_z.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_z.T, hidden[rows].float())
            if need_bias:
                grad_bias.add_(grad_z.sum(0))
            del grad_z
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _chunk_grad_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    transform: _LogitTransform,
) -> torch.Tensor:
    """fp32 ``[C, V]`` gradient of the loss with respect to one chunk's raw logits ``hidden @ weight.T + bias``.

    With ``z`` the final logits, ``p = softmax(z)`` and ``Hn = -sum p log p``:
    ``d logp_t / dz_j = 1[j = t] - p_j`` and ``d Hn / dz_j = -p_j (log p_j + Hn)``. The chain back to raw logits
    multiplies by ``1 - tanh^2`` (softcap) and by ``scale / divisor / temperature``.
    """
    z = _chunk_logits(hidden, weight, bias, transform)
    cap_grad = transform.softcap_grad(z) if transform.softcap is not None else None
    logp = z.sub_(lse.unsqueeze(1))
    probs = logp.exp()
    if grad_entropy is not None:
        # coef_j = g_lp + g_H * (log p_j + Hn), then grad_z = -p * coef, all in place on the log-prob buffer.
        coef = logp.add_(entropy.unsqueeze(1)).mul_(grad_entropy.unsqueeze(1))
        if grad_logprobs is not None:
            coef.add_(grad_logprobs.unsqueeze(1))
        grad_z = probs.mul_(coef).neg_()
    else:
        grad_z = probs.mul_(grad_logprobs.unsqueeze(1).neg())
    del logp
    if grad_logprobs is not None:
        grad_z.scatter_add_(1, targets.unsqueeze(1), grad_logprobs.unsqueeze(1).float())
    if cap_grad is not None:
        grad_z.mul_(cap_grad)
    return grad_z.mul_(transform.linear_factor)


def selective_logprobs_torch(
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
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked log-probabilities of ``targets`` (and entropies) under ``softmax(f(hidden @ weight.T + bias))``.

    Never holds more than one chunk of ``[chunk_size, V]`` logits in the forward; the backward recomputes them
    chunk by chunk. Differentiable with respect to ``hidden``, ``weight`` and ``bias``.

    Args:
        hidden: ``[N, H]`` fp32/bf16/fp16, any strides, any device.
        weight: ``[V, H]``, same dtype and device as ``hidden``.
        targets: ``[N]`` int64 with values in ``[0, V)``.
        bias: Optional ``[V]``, same dtype as ``weight``.
        temperature: Positive divisor applied to the fp32 logits after every other transform.
        logit_scale: Optional multiplier of the raw logits.
        logit_divisor: Optional non-zero divisor, applied after ``logit_scale``.
        softcap: Optional positive cap: ``z = softcap * tanh(z / softcap)``.
        return_entropy: Whether to compute the entropy output.
        chunk_size: Tokens per chunk; ``None`` means ``default_chunk_size(V)``.

    Returns:
        ``(logprobs, entropy)``: float32 ``[N]`` each; ``entropy`` is ``None`` unless ``return_entropy``.

    Example:
        >>> h, w, t = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
        >>> lp, ent = selective_logprobs_torch(
        ...     h, w, t, None, temperature=1.0, logit_scale=None, logit_divisor=None, softcap=None,
        ...     return_entropy=True, chunk_size=4)
        >>> lp.shape, ent.shape
        (torch.Size([6]), torch.Size([6]))
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    chunk_size = max(1, min(chunk_size, hidden.shape[0]))
    transform = _LogitTransform(float(temperature), logit_scale, logit_divisor, softcap)
    return ChunkedSelectiveLogprobs.apply(hidden, weight, bias, targets, transform, return_entropy, chunk_size)
