"""Public functional API: argument checks, flattening and backend dispatch."""

from __future__ import annotations

import os

import torch

from longctx_kernels._validation import validate_options, validate_tensors
from longctx_kernels.ops.torch.selective_logprobs import selective_logprobs_torch

try:
    from longctx_kernels.ops.triton.selective_logprobs import selective_logprobs_triton

    _TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # Triton (or the Triton op) is optional: the torch backend covers every device.
    selective_logprobs_triton = None
    _TRITON_IMPORT_ERROR = exc


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ``selective_logprobs`` runs for ``backend`` on tensors of ``device``: "torch" or "triton".

    "auto" is Triton for CUDA tensors when it imports, else torch. Callers that size the torch backend's
    ``chunk_size`` (which Triton ignores: it tiles on its own) read it here first.

    Raises:
        RuntimeError: An explicit "triton" cannot run (Triton missing, or not CUDA without ``TRITON_INTERPRET=1``).
    """
    triton_available = selective_logprobs_triton is not None
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available else "torch"
    if not triton_available:
        raise RuntimeError(
            "backend='triton' is unavailable: importing longctx_kernels.ops.triton.selective_logprobs failed "
            f"({_TRITON_IMPORT_ERROR!r}). Install `longctx-kernels[triton]` or pass backend='torch' or 'auto'."
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got device {device}. Pass backend='torch' or 'auto' "
            "(or set TRITON_INTERPRET=1 to run the Triton interpreter on CPU, for testing)."
        )
    return "triton"


def selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    logit_divisor: float | None = None,
    softcap: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` under the lm_head, without materializing the ``[..., V]`` logits.

    Computes, in this order: ``z = hidden @ weight.T (+ bias)``, ``z *= logit_scale``, ``z /= logit_divisor``,
    ``z = softcap * tanh(z / softcap)`` (each only when given), ``z = z.float() / temperature``, then
    ``log_softmax(z)[target]`` and, optionally, the entropy ``-(p * log p).sum(-1)``. Softmax and entropy
    accumulate in fp32. Gradients flow to ``hidden``, and to ``weight``/``bias`` when they require grad.

    Args:
        hidden: ``[..., H]`` float32, bfloat16 or float16; any strides; any number of tokens (0 gives empty
            outputs).
        weight: ``[V, H]`` lm_head weight, same dtype and device as ``hidden``.
        targets: ``[...]`` integer tensor (``hidden.shape[:-1]``) with values in ``[0, V)``.
        bias: Optional ``[V]`` lm_head bias, same dtype as ``weight``.
        temperature: Positive, finite; divides the processed fp32 logits (vLLM's processed logprobs are
            post-temperature).
        logit_scale: Optional finite multiplier of the logits.
        logit_divisor: Optional finite, non-zero divisor of the logits.
        softcap: Optional positive tanh soft-cap of the logits.
        return_entropy: Also return the entropy of each token's distribution.
        backend: "auto" (Triton for CUDA tensors when it imports, else torch), "torch" (chunked, any device) or
            "triton" (CUDA; on CPU only with ``TRITON_INTERPRET=1``).
        chunk_size: Tokens per chunk for the torch backend; ``None`` means ``default_chunk_size(V)``
            (256 MiB of fp32 logits per chunk). The Triton backend tiles on its own and ignores it.

    Returns:
        float32 ``[...]`` log-probabilities, or ``(logprobs, entropy)`` both float32 ``[...]`` when
        ``return_entropy`` is true.

    Raises:
        TypeError: For a non-tensor input, an unsupported or mismatched dtype, non-integer ``targets``, or a
            non-numeric option.
        ValueError: For a wrong shape, a target outside ``[0, V)``, tensors on different devices,
            ``temperature <= 0``, ``softcap <= 0``, ``logit_divisor == 0``, ``chunk_size <= 0`` or an unknown
            ``backend``.
        RuntimeError: If ``backend="triton"`` cannot run (Triton missing, or tensors not on CUDA).

    Example:
        >>> hidden = torch.randn(2, 16, 64, requires_grad=True)
        >>> weight = torch.randn(1000, 64)
        >>> targets = torch.randint(0, 1000, (2, 16))
        >>> logprobs, entropy = selective_logprobs(hidden, weight, targets, temperature=0.9, return_entropy=True)
        >>> logprobs.shape, entropy.dtype
        (torch.Size([2, 16]), torch.float32)
        >>> logprobs.sum().backward()
    """
    validate_options(
        temperature=temperature,
        logit_scale=logit_scale,
        logit_divisor=logit_divisor,
        softcap=softcap,
        chunk_size=chunk_size,
        backend=backend,
    )
    validate_tensors(hidden, weight, targets, bias)
    leading_shape = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    options = {
        "temperature": float(temperature),
        "logit_scale": None if logit_scale is None else float(logit_scale),
        "logit_divisor": None if logit_divisor is None else float(logit_divisor),
        "softcap": None if softcap is None else float(softcap),
        "return_entropy": bool(return_entropy),
    }
    resolved = resolve_backend(backend, hidden.device)
    # Zero tokens: nothing to launch, and the torch path already returns correctly shaped, differentiable empties.
    if resolved == "triton" and flat_hidden.shape[0] > 0:
        logprobs, entropy = selective_logprobs_triton(flat_hidden, weight, flat_targets, bias, **options)
    else:
        logprobs, entropy = selective_logprobs_torch(
            flat_hidden, weight, flat_targets, bias, chunk_size=chunk_size, **options
        )
    logprobs = logprobs.reshape(leading_shape)
    if not return_entropy:
        return logprobs
    return logprobs, entropy.reshape(leading_shape)
