"""Triton backend on CUDA: triton vs torch backend vs float64 on fresh random shapes (bf16 and fp32)."""

from __future__ import annotations

import os

import pytest
import torch
from kernels_testing import (
    assert_error_within,
    assert_verbose_close,
    make_inputs,
    naive_same_dtype,
    outputs_and_grads,
    reference_outputs_and_grads,
)

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels, not the interpreter"),
]

from longctx_kernels import selective_logprobs  # noqa: E402

# (dtype, value tolerance, gradient tolerance): fp32 against float64; bf16 by the relative rule (max error <=
# factor x max error of naive same-dtype logits + slack), as in the torch backend's tests.
TOLERANCES = [
    pytest.param(torch.float32, {"atol": 1e-5, "rtol": 1e-4}, {"atol": 1e-5, "rtol": 1e-3}, id="fp32"),
    pytest.param(torch.bfloat16, {"factor": 2.0, "slack": 1e-3}, {"factor": 2.0, "slack": 1e-2}, id="bf16"),
]

# (tokens, hidden, vocab, bias, weight requires grad, entropy gradient), logit options. Sizes cross the row
# chunk (1024) and vocabulary chunk (16384) boundaries and are not multiples of the tiles.
CASES = [
    pytest.param((1, 128, 1000, False, False, False), {}, id="single-token"),
    pytest.param((1500, 256, 40000, False, False, False), {"temperature": 0.7}, id="1500x256x40000"),
    pytest.param((333, 200, 17001, True, False, True), {"softcap": 30.0, "logit_scale": 1.3}, id="odd-entropy-grad"),
    pytest.param((300, 256, 5003, True, True, True), {"temperature": 1.1, "logit_divisor": 2.0}, id="trainable-head"),
]
_DEFAULTS = {"temperature": 1.0, "logit_scale": None, "logit_divisor": None, "softcap": None}


def _backend(name):
    def fn(hidden, weight, targets, *, bias=None, **options):
        return selective_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=name, **options)

    return fn


@pytest.mark.parametrize(("dtype", "value_tol", "grad_tol"), TOLERANCES)
@pytest.mark.parametrize(("shape", "options"), CASES)
def test_triton_vs_torch_vs_float64(shape, options, dtype, value_tol, grad_tol):
    n, hdim, vocab, bias, weight_grad, entropy_grad = shape
    options = {**_DEFAULTS, **options}
    inputs = make_inputs((n,), hdim, vocab, dtype, bias=bias, weight_requires_grad=weight_grad, device="cuda")
    if inputs["bias"] is not None:
        inputs["bias"].requires_grad_(weight_grad)
    g_lp = torch.randn(n, device="cuda")
    g_ent = torch.randn(n, device="cuda") if entropy_grad else None
    expected = reference_outputs_and_grads(inputs, g_lp, g_ent, **options)
    got = {name: outputs_and_grads(_backend(name), inputs, g_lp, g_ent, **options) for name in ("triton", "torch")}
    naive = None
    if dtype != torch.float32:
        naive = outputs_and_grads(
            lambda h, w, t, bias=None, **o: naive_same_dtype(h, w, t, bias=bias, **o), inputs, g_lp, g_ent, **options
        )
    for name, actual in got.items():
        for key in ("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias"):
            if expected[key] is None:
                assert actual[key] is None
                continue
            tol = value_tol if key in ("logprobs", "entropy") else grad_tol
            label = f"{name}/{key}"
            if naive is None:
                assert_verbose_close(actual[key], expected[key], name=label, **tol)
            else:
                assert_error_within(actual[key], naive[key], expected[key], name=label, **tol)


def test_stored_gradient_is_used_once():
    inputs = make_inputs((64,), 128, 3000, torch.bfloat16, weight_requires_grad=False, device="cuda")
    lp = selective_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], backend="triton")
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()


def test_resources_reported():
    from longctx_kernels.ops.triton import compiled_resources

    inputs = make_inputs((256,), 512, 20000, torch.bfloat16, weight_requires_grad=False, device="cuda")
    selective_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], backend="triton").sum().backward()
    report = compiled_resources()
    assert {"logits_tile_kernel", "gemm_acc_kernel", "combine_tiles_kernel", "finish_grad_kernel"} <= set(report)
    # Spills are reported, not failed on: the tile sizes trade them against speed (docs/benchmarks.md).
    print("triton kernels:", report)
    for name, res in report.items():
        assert 0 < res["n_regs"] <= 255 and res["n_spills"] >= 0, f"{name}: {res}"
