"""Compile the Triton kernels of ``selective_logprobs`` before its first real call, optionally in the background.

A process's first ``selective_logprobs`` calls on CUDA compile every kernel variant they launch: seconds of CPU work
per variant where Triton's on-disk cache is empty (a new machine). Which variants run depends on the lm_head (hidden
size, vocabulary, dtype, bias, soft-cap), on whether the gradient is stored and the entropy computed, and on each
call's token count, but once a call has more than 128 tokens (fewer take smaller tiles) only through its
divisibility by 16 (Triton specializes integer arguments by it) and, with a trainable lm_head, by 64. ``warm_up``
makes one call of each variant on a few tokens of random hidden states against the real lm_head, so that every later
call of more than 128 tokens finds its kernels compiled, in memory and in Triton's on-disk cache.

Triton compiles mostly outside the GIL, so ``warm_up_in_background`` can run it on a thread while the process does
other work (a rollout), with its launches on a CUDA stream of its own; ``BackgroundWarmUp.wait`` joins it before the
first real call and re-raises what went wrong there.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from longctx_kernels.functional import resolve_backend, selective_logprobs

__all__ = ["BackgroundWarmUp", "WARM_UP_TOKENS", "warm_up", "warm_up_in_background"]

# Token counts of the warm-up calls: above 128 (the tiles of longer calls), of the three kinds that select kernel
# variants: a multiple of 64 (with a trainable lm_head the weight-gradient gemm reduces over the tokens, whose count
# decides its EVEN_K), a multiple of 16 but not of 64, and neither.
WARM_UP_TOKENS = (192, 144, 145)


def warm_up(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float | None = None,
    logit_divisor: float | None = None,
    softcap: float | None = None,
    entropy_gradient: bool = False,
) -> int:
    """Launch every Triton kernel variant later ``selective_logprobs`` calls on this lm_head will launch.

    Per token count of ``WARM_UP_TOKENS``: without and with gradient, without and with entropy (the entropy's own
    gradient when ``entropy_gradient``; the weight's and the bias's when they require grad), each forward and backward.
    Inputs are random; nothing is returned from them and nothing of ``weight`` or ``bias`` changes.

    Args:
        weight: The lm_head weight ``[V, H]`` the real calls will use (CUDA).
        bias, logit_scale, logit_divisor, softcap: As the real calls pass them (they select kernel variants; the
            temperature does not).
        entropy_gradient: Whether the real calls back-propagate through the entropy.

    Returns:
        The number of ``selective_logprobs`` calls made.

    Raises:
        RuntimeError: ``weight`` is not where the Triton backend runs (it says which backend would).
    """
    if resolve_backend("auto", weight.device) != "triton":
        raise RuntimeError(
            f"warm_up compiles Triton kernels, but selective_logprobs runs the torch backend for a weight on "
            f"{weight.device}: nothing to compile. Call it for a CUDA weight with Triton installed."
        )
    options = {"bias": bias, "logit_scale": logit_scale, "logit_divisor": logit_divisor, "softcap": softcap,
               "backend": "triton"}  # fmt: skip
    calls = 0
    generator = torch.Generator(device=weight.device).manual_seed(0)
    for tokens in WARM_UP_TOKENS:
        targets = torch.randint(0, weight.size(0), (tokens,), device=weight.device, generator=generator)
        for grad in (False, True):
            for entropy in (False, True):
                hidden = torch.randn(tokens, weight.size(1), device=weight.device, dtype=weight.dtype,
                                     generator=generator).requires_grad_(grad)  # fmt: skip
                with torch.set_grad_enabled(grad):
                    out = selective_logprobs(hidden, weight, targets, return_entropy=entropy, **options)
                    logprobs, ent = out if entropy else (out, None)
                    if grad:
                        loss = logprobs.sum() + (ent.sum() if entropy and entropy_gradient else 0.0)
                        # Gradients of the weight and bias (when they require grad) land in autograd.grad's result,
                        # not in their .grad.
                        inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
                        torch.autograd.grad(loss, inputs)
                calls += 1
    return calls


@dataclass
class BackgroundWarmUp:
    """A ``warm_up`` running on a thread of its own.

    Attributes:
        started: ``time.perf_counter()`` when the thread started.
        seconds: How long the warm-up took, once it ended.
        calls: ``warm_up``'s result, once it ended.
    """

    started: float
    seconds: float | None = None
    calls: int | None = None
    _thread: threading.Thread | None = None
    _error: BaseException | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> float:
        """Join the warm-up; returns the seconds this call waited for it.

        Raises:
            RuntimeError: The warm-up failed (its error chained): the real calls would have failed the same way.
        """
        start = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"The Triton warm-up of selective_logprobs failed: {self._error!r}") from self._error
        return time.perf_counter() - start


def warm_up_in_background(weight: torch.Tensor, bias: torch.Tensor | None = None, **options) -> BackgroundWarmUp:
    """Run ``warm_up(weight, bias, **options)`` on a daemon thread, its launches on a CUDA stream of its own.

    Start it only where no CUDA graph is being captured meanwhile in this process: a capture fails on another
    thread's allocations.

    Returns:
        The ``BackgroundWarmUp`` to ``wait`` on before the first real call.
    """
    if resolve_backend("auto", weight.device) != "triton":  # the same refusal, raised here rather than on the thread
        warm_up(weight, bias, **options)
    handle = BackgroundWarmUp(time.perf_counter())
    caller_stream = torch.cuda.current_stream(weight.device)  # current streams are per thread: read it here

    def run() -> None:
        try:
            stream = torch.cuda.Stream(device=weight.device)
            # The weight was written on the caller's stream: the side stream starts after it.
            stream.wait_stream(caller_stream)
            with torch.cuda.stream(stream):
                handle.calls = warm_up(weight, bias, **options)
            stream.synchronize()
        except BaseException as error:  # noqa: BLE001 - re-raised by wait() in the caller's thread
            handle._error = error
        finally:
            handle.seconds = time.perf_counter() - handle.started

    handle._thread = threading.Thread(target=run, name="longctx-triton-warm-up", daemon=True)
    handle._thread.start()
    return handle
