"""`longctx_kernels.warmup`: after `warm_up`, the calls a training run makes (more than 128 tokens, any count, with
and without gradient and entropy) compile no Triton kernel; refusals and failures reach the caller.

No tolerances: the GPU test counts compiled kernel variants, and the CPU tests check what is raised.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from longctx_kernels import selective_logprobs
from longctx_kernels import warmup as warmup_module
from longctx_kernels.warmup import BackgroundWarmUp, warm_up, warm_up_in_background


def test_a_weight_the_triton_backend_does_not_run_on_is_refused():
    weight = torch.randn(100, 16)
    for call in (warm_up, warm_up_in_background):
        with pytest.raises(RuntimeError, match="runs the torch backend for a weight on cpu: nothing to compile"):
            call(weight)


def test_a_failure_on_the_thread_is_raised_by_wait(monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("compile failed")

    monkeypatch.setattr(warmup_module, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(warmup_module, "warm_up", fail)

    # No CUDA here: the side stream the thread would open is replaced by one that does nothing.
    class NoStream:
        def __init__(self, device):
            pass

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    handle = warm_up_in_background(torch.randn(100, 16))
    with pytest.raises(RuntimeError, match="The Triton warm-up of selective_logprobs failed") as raised:
        handle.wait()
    assert isinstance(raised.value.__cause__, ValueError) and str(raised.value.__cause__) == "compile failed"
    assert handle.done and handle.seconds is not None


def test_wait_without_a_thread_returns_at_once():
    handle = BackgroundWarmUp(started=0.0, seconds=1.5, calls=8)
    assert handle.done and handle.wait() < 0.1


def _compiled_variants() -> int:
    from longctx_kernels.ops.triton import _kernels

    kernels = (_kernels.logits_tile_kernel, _kernels.combine_tiles_kernel, _kernels.gemm_acc_kernel,
               _kernels.finish_grad_kernel)  # fmt: skip
    return sum(len(entry[0]) for kernel in kernels for entry in kernel.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels, not the interpreter")
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_after_the_warm_up_a_run_compiles_nothing(dtype, trainable_head):
    pytest.importorskip("triton")
    weight = torch.randn(40000, 512, device="cuda", dtype=dtype).requires_grad_(trainable_head)
    handle = warm_up_in_background(weight)
    handle.wait()
    assert handle.calls == 12
    before = _compiled_variants()
    for tokens in (1500, 2048, 4101, 129, 1024):
        for grad in (False, True):
            for entropy in (False, True):
                hidden = torch.randn(tokens, 512, device="cuda", dtype=dtype, requires_grad=grad)
                targets = torch.randint(0, 40000, (tokens,), device="cuda")
                with torch.set_grad_enabled(grad):
                    out = selective_logprobs(hidden, weight, targets, return_entropy=entropy, backend="triton")
                    if grad:
                        (out[0] if entropy else out).sum().backward()
    torch.cuda.synchronize()
    assert _compiled_variants() == before
