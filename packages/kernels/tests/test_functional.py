"""Public ``selective_logprobs``: shapes, strides, dtypes of outputs, and backend dispatch."""

from __future__ import annotations

import pytest
import torch
from kernels_testing import (
    assert_verbose_close,
    make_inputs,
    outputs_and_grads,
    reference_outputs_and_grads,
)

import longctx_kernels.functional as functional
from longctx_kernels import selective_logprobs

VALUE_TOL = {"atol": 1e-5, "rtol": 1e-4}
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-3}


def _api(hidden, weight, targets, *, bias=None, **options):
    return selective_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend="torch", **options)


def _check_against_reference(inputs, **options):
    grad_lp = torch.randn(inputs["targets"].shape)
    grad_ent = torch.randn(inputs["targets"].shape)
    ours = outputs_and_grads(_api, inputs, grad_lp, grad_ent, **options)
    ref = reference_outputs_and_grads(
        inputs, grad_lp, grad_ent, **{k: v for k, v in options.items() if k != "chunk_size"}
    )
    for key, value in ours.items():
        if value is None:
            assert ref[key] is None, key
        else:
            tol = VALUE_TOL if key in ("logprobs", "entropy") else GRAD_TOL
            assert_verbose_close(value, ref[key], **tol, name=key)
    return ours


@pytest.mark.parametrize("lead_shape", [(), (1,), (9,), (3, 5), (4, 47), (2, 3, 5)], ids=str)
def test_leading_dims(lead_shape):
    inputs = make_inputs(lead_shape, 31, 123, torch.float32, bias=True)
    ours = _check_against_reference(inputs, temperature=0.9, chunk_size=7)
    assert ours["logprobs"].shape == ours["entropy"].shape == lead_shape


@pytest.mark.parametrize("layout", ["transposed", "sliced", "weight-transposed"])
def test_non_contiguous_inputs(layout):
    tokens, hidden_size, vocab = 6, 16, 101
    inputs = make_inputs((tokens,), hidden_size, vocab, torch.float32)
    if layout == "transposed":  # [T, B, H] -> [B, T, H] view
        inputs["hidden"] = torch.randn(5, 3, hidden_size).transpose(0, 1).requires_grad_()
        inputs["targets"] = torch.randint(0, vocab, (3, 5))
    elif layout == "sliced":  # every other feature of a wider tensor; stays a strided view after flattening
        inputs["hidden"] = torch.randn(tokens, 2 * hidden_size)[:, ::2].requires_grad_()
    else:
        inputs["weight"] = torch.randn(hidden_size, vocab).T.requires_grad_()
    assert not inputs["hidden"].is_contiguous() or not inputs["weight"].is_contiguous()
    _check_against_reference(inputs, softcap=3.0, chunk_size=4)


@pytest.mark.parametrize("lead_shape", [(0,), (2, 0)], ids=str)
def test_zero_tokens(lead_shape):
    inputs = make_inputs(lead_shape, 8, 17, torch.float32, bias=True)
    logprobs, entropy = _api(**inputs)
    assert logprobs.shape == entropy.shape == lead_shape
    assert logprobs.dtype == torch.float32
    (logprobs.sum() + entropy.sum()).backward()
    assert inputs["hidden"].grad.shape == inputs["hidden"].shape
    assert torch.count_nonzero(inputs["weight"].grad) == 0


def test_return_types_and_frozen_weight():
    inputs = make_inputs((2, 3), 8, 17, torch.bfloat16, bias=True, weight_requires_grad=False)
    logprobs = selective_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"])
    assert isinstance(logprobs, torch.Tensor)
    assert logprobs.shape == (2, 3) and logprobs.dtype == torch.float32
    logprobs.sum().backward()
    assert inputs["hidden"].grad.dtype == torch.bfloat16
    assert inputs["weight"].grad is None
    assert inputs["bias"].grad is not None and inputs["bias"].grad.dtype == torch.bfloat16


def test_int32_targets_accepted():
    inputs = make_inputs((4,), 8, 17, torch.float32)
    expected = selective_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"])
    actual = selective_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"].int())
    torch.testing.assert_close(actual, expected)


class _FakeTritonOp:
    """Stands in for the Triton op to pin the call contract: flattened [N, H], [N] int64, keyword options."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, hidden, weight, targets, bias, **options):
        self.calls.append(((hidden, weight, targets, bias), options))
        n = hidden.shape[0]
        entropy = torch.ones(n) if options["return_entropy"] else None
        return torch.zeros(n), entropy


def test_triton_backend_dispatch_contract(monkeypatch):
    fake = _FakeTritonOp()
    monkeypatch.setattr(functional, "selective_logprobs_triton", fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_inputs((2, 3), 8, 17, torch.float32, bias=True)
    logprobs, entropy = selective_logprobs(**inputs, temperature=2, softcap=5, return_entropy=True, backend="triton")
    assert logprobs.shape == entropy.shape == (2, 3)
    (hidden, weight, targets, bias), options = fake.calls[0]
    assert hidden.shape == (6, 8) and targets.shape == (6,) and targets.dtype == torch.int64
    assert weight is inputs["weight"] and bias is inputs["bias"]
    assert options == {
        "temperature": 2.0,
        "logit_scale": None,
        "logit_divisor": None,
        "softcap": 5.0,
        "return_entropy": True,
    }


def test_auto_uses_torch_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("auto picked triton for CPU tensors")

    monkeypatch.setattr(functional, "selective_logprobs_triton", fail)
    inputs = make_inputs((3,), 8, 17, torch.float32)
    assert selective_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"]).shape == (3,)


def test_resolve_backend_says_what_runs(monkeypatch):
    """`resolve_backend` is the dispatch `selective_logprobs` uses: callers sizing the torch chunk ask it first."""
    monkeypatch.setattr(functional, "selective_logprobs_triton", _FakeTritonOp())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [functional.resolve_backend(b, cpu) for b in ("auto", "torch")] == ["torch", "torch"]
    assert [functional.resolve_backend(b, cuda) for b in ("auto", "torch", "triton")] == ["triton", "torch", "triton"]
    monkeypatch.setattr(functional, "selective_logprobs_triton", None)
    assert functional.resolve_backend("auto", cuda) == "torch"
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        functional.resolve_backend("triton", cuda)


def test_triton_backend_unavailable(monkeypatch):
    monkeypatch.setattr(functional, "selective_logprobs_triton", None)
    inputs = make_inputs((3,), 8, 17, torch.float32)
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        selective_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], backend="triton")


def test_triton_backend_needs_cuda(monkeypatch):
    monkeypatch.setattr(functional, "selective_logprobs_triton", _FakeTritonOp())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs((3,), 8, 17, torch.float32)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        selective_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_matches_reference(backend):
    inputs = make_inputs((3, 41), 32, 1001, torch.float32, bias=True, device="cuda")
    grad_lp, grad_ent = torch.randn(3, 41, device="cuda"), torch.randn(3, 41, device="cuda")
    options = {"temperature": 0.7, "softcap": 10.0}

    def run(hidden, weight, targets, *, bias=None, **kw):
        return selective_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend, **kw)

    ours = outputs_and_grads(run, inputs, grad_lp, grad_ent, **options)
    ref = reference_outputs_and_grads(inputs, grad_lp, grad_ent, **options)
    for key, value in ours.items():
        tol = VALUE_TOL if key in ("logprobs", "entropy") else GRAD_TOL
        assert_verbose_close(value, ref[key], **tol, name=key)
