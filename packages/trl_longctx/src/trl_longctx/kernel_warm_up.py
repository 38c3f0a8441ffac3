"""The trainer's Triton warm-up: the fused log-prob kernels compiled for its lm_head while the first rollout runs.

`start_kernel_warm_up` starts `longctx_kernels.warmup.warm_up_in_background` once the trainer is built (vLLM's CUDA
graphs are captured by then: a capture would fail on the warm-up's allocations) where it can help, or says why not;
`KernelWarmUp.wait` joins it before the first log-prob pass and logs what it cost and what the pass waited.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .model_heads import decoder_and_lm_head, logit_transform_from_config, plain_lm_head_weights

logger = logging.getLogger(__name__)

__all__ = ["KernelWarmUp", "start_kernel_warm_up", "warm_up_refusal"]


def warm_up_refusal(enabled: bool, backend: str, model: nn.Module) -> str | None:
    """Why the kernels of `model`'s lm_head are not warmed up (`None`: they are), naming the setting.

    Args:
        enabled: The config's `warm_up_kernels`.
        backend: The backend the log-prob pass runs (`LogProbPass.backend`).
        model: The unwrapped model.
    """
    head = _head_or_refusal(enabled, backend, model)
    return head if isinstance(head, str) else None


def _head_or_refusal(enabled: bool, backend: str, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """`model`'s lm_head `(weight, bias)` to warm the kernels up for, or why not (`warm_up_refusal`)."""
    if not enabled:
        return "warm_up_kernels=False"
    if backend != "triton":
        return (
            f"the log-prob pass runs the {backend} backend, which compiles nothing (the Triton backend runs on CUDA)"
        )
    head = plain_lm_head_weights(decoder_and_lm_head(model)[1])
    if head is None:
        return "the lm_head carries an adapter, so its log-probs take TRL's path"
    weight = head[0]
    whole = weight.device.type == "cuda" and weight.dim() == 2 and weight.numel() > 0
    if not whole or type(weight) not in (torch.Tensor, nn.Parameter):
        return (
            f"the lm_head weight is not a whole CUDA tensor here ({type(weight).__name__} of shape "
            f"{tuple(weight.shape)} on {weight.device}; ZeRO-3 and FSDP shard it and gather it only inside the passes)"
        )
    return head


class KernelWarmUp:
    """The background warm-up of one trainer, waited for once.

    Args:
        handle: The running `longctx_kernels.warmup.BackgroundWarmUp`.
    """

    def __init__(self, handle):
        self._handle = handle

    def wait(self) -> None:
        """Join the warm-up (the first time only) and log its time and the time waited.

        Raises:
            RuntimeError: The warm-up failed; the first pass would fail the same way.
        """
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        waited = handle.wait()
        logger.warning(
            "Triton kernels of the fused log-probs: %d warm-up calls compiled them in the background in %.1f s; the "
            "first log-prob pass waited %.1f s for them (warm_up_kernels=False leaves them to the first step).",
            handle.calls, handle.seconds, waited,
        )  # fmt: skip


def start_kernel_warm_up(enabled: bool, backend: str, model: nn.Module) -> KernelWarmUp | None:
    """Start warming up the kernels of `model`'s lm_head on a background thread, or log why not.

    Args:
        enabled: The config's `warm_up_kernels`.
        backend: The backend the log-prob pass runs (`LogProbPass.backend`).
        model: The unwrapped model (its lm_head and logit transform select the kernels).

    Returns:
        The `KernelWarmUp` to wait on before the first pass; `None` when not started.
    """
    head = _head_or_refusal(enabled, backend, model)
    if isinstance(head, str):
        if enabled:
            logger.info("Triton kernels are not warmed up before the first step: %s.", head)
        return None
    from longctx_kernels.warmup import warm_up_in_background

    weight, bias = head
    transform = logit_transform_from_config(model.config)
    handle = warm_up_in_background(
        weight, bias, logit_scale=transform.logit_scale, logit_divisor=transform.logit_divisor,
        softcap=transform.softcap,
    )  # fmt: skip
    return KernelWarmUp(handle)
