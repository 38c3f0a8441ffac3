"""Chunked torch backend against the float64 reference, plus proofs that it stays chunked in memory."""

from __future__ import annotations

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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longctx_kernels import selective_logprobs_reference
from longctx_kernels.ops.torch.selective_logprobs import selective_logprobs_torch

# (dtype, value tolerance, gradient tolerance). fp32: absolute/relative against float64. bf16/fp16: the relative
# rule of flash-attention / CCE, max error <= factor x max error of the naive same-dtype computation + slack.
TOLERANCES = [
    pytest.param(torch.float32, {"atol": 1e-5, "rtol": 1e-4}, {"atol": 1e-5, "rtol": 1e-3}, id="fp32"),
    pytest.param(torch.bfloat16, {"factor": 2.0, "slack": 1e-3}, {"factor": 2.0, "slack": 1e-2}, id="bf16"),
    pytest.param(torch.float16, {"factor": 2.0, "slack": 1e-3}, {"factor": 2.0, "slack": 1e-2}, id="fp16"),
]

# (shape: tokens, hidden, vocab, chunk_size, bias), logit options.
CASES = [
    pytest.param((16, 32, 123, 5, False), {}, id="base"),
    pytest.param((4 * 47, 31, 123, 64, False), {}, id="odd-4x47x31x123"),
    pytest.param((20, 16, 1001, 7, False), {"temperature": 0.7}, id="v1001-temperature"),
    pytest.param((1, 8, 123, None, False), {}, id="single-token"),
    pytest.param((24, 16, 123, 5, False), {"softcap": 2.5, "temperature": 1.3}, id="softcap"),
    pytest.param((24, 16, 123, 10, False), {"logit_scale": 1.7, "logit_divisor": 0.8}, id="scale-divisor"),
    pytest.param((24, 16, 123, 9, True), {}, id="bias"),
    pytest.param(
        (30, 16, 1001, 8, True),
        {"temperature": 0.6, "logit_scale": 1.5, "logit_divisor": 2.0, "softcap": 4.0},
        id="all-options",
    ),
]

_DEFAULTS = {"temperature": 1.0, "logit_scale": None, "logit_divisor": None, "softcap": None}


def _torch_op(hidden, weight, targets, *, bias=None, chunk_size=None, **options):
    return selective_logprobs_torch(
        hidden, weight, targets, bias, return_entropy=True, chunk_size=chunk_size, **{**_DEFAULTS, **options}
    )


def _check(ours, naive, ref, value_tol, grad_tol):
    for key in ours:
        if ours[key] is None:
            assert ref[key] is None, f"{key} missing"
            continue
        tol = value_tol if key in ("logprobs", "entropy") else grad_tol
        if "atol" in tol:
            assert_verbose_close(ours[key], ref[key], **tol, name=key)
        else:
            assert_error_within(ours[key], naive[key], ref[key], **tol, name=key)


@pytest.mark.parametrize("dtype, value_tol, grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape, options", CASES)
@pytest.mark.parametrize("weight_requires_grad", [True, False], ids=["weight-grad", "weight-frozen"])
def test_matches_reference(shape, options, dtype, value_tol, grad_tol, weight_requires_grad):
    tokens, hidden_size, vocab, chunk_size, bias = shape
    inputs = make_inputs((tokens,), hidden_size, vocab, dtype, bias=bias, weight_requires_grad=weight_requires_grad)
    grad_lp, grad_ent = torch.randn(tokens), torch.randn(tokens)
    ours = outputs_and_grads(_torch_op, inputs, grad_lp, grad_ent, chunk_size=chunk_size, **options)
    ref = reference_outputs_and_grads(inputs, grad_lp, grad_ent, **options)
    naive = outputs_and_grads(naive_same_dtype, inputs, grad_lp, grad_ent, **options)
    assert ours["logprobs"].dtype == ours["entropy"].dtype == torch.float32
    if weight_requires_grad:
        assert ours["grad_weight"].dtype == dtype
    _check(ours, naive, ref, value_tol, grad_tol)


@pytest.mark.parametrize("which", ["logprobs-only", "entropy-only"])
def test_gradient_of_one_output(which):
    """Each output's backward alone (the other output's gradient arrives as None)."""
    options = {"temperature": 0.8, "logit_scale": 1.2, "logit_divisor": 1.1, "softcap": 3.0}
    inputs = make_inputs((19,), 12, 123, torch.float32, bias=True)
    grad_lp = torch.randn(19) if which == "logprobs-only" else None
    grad_ent = torch.randn(19) if which == "entropy-only" else None
    ours = outputs_and_grads(_torch_op, inputs, grad_lp, grad_ent, chunk_size=4, **options)
    ref = reference_outputs_and_grads(inputs, grad_lp, grad_ent, **options)
    _check(ours, None, ref, {"atol": 1e-5, "rtol": 1e-4}, {"atol": 1e-5, "rtol": 1e-3})


def test_no_entropy_requested_returns_none():
    inputs = make_inputs((5,), 8, 33, torch.float32)
    logprobs, entropy = selective_logprobs_torch(
        inputs["hidden"], inputs["weight"], inputs["targets"], None, return_entropy=False, chunk_size=2, **_DEFAULTS
    )
    assert entropy is None
    logprobs.sum().backward()
    ref, _ = selective_logprobs_reference(inputs["hidden"], inputs["weight"], inputs["targets"])
    assert_verbose_close(logprobs.detach(), ref.detach(), atol=1e-5, rtol=1e-4, name="logprobs")


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunk_size_does_not_change_results(chunk_size):
    """chunk_size only changes how many rows are in flight, not the math (up to GEMM blocking rounding)."""
    options = {"temperature": 0.9, "softcap": 5.0}
    inputs = make_inputs((37,), 16, 123, torch.float32, bias=True)
    grad_lp, grad_ent = torch.randn(37), torch.randn(37)
    whole = outputs_and_grads(_torch_op, inputs, grad_lp, grad_ent, chunk_size=37, **options)
    chunked = outputs_and_grads(_torch_op, inputs, grad_lp, grad_ent, chunk_size=chunk_size, **options)
    for key, value in whole.items():
        assert_verbose_close(chunked[key], value, atol=1e-6, rtol=1e-5, name=key)


class _RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend((str(func), tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _largest_intermediate(fn, inputs, **options) -> tuple[str, tuple[int, ...]]:
    with _RecordShapes() as recorder:
        logprobs, entropy = fn(inputs["hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"], **options)
        (logprobs.sum() + entropy.sum()).backward()
    return max(recorder.shapes, key=lambda item: torch.Size(item[1]).numel())


def test_no_intermediate_larger_than_one_chunk():
    # tokens * V = 16448 > chunk * V = 2056 > V * H = 1028 (the weight gradient), so any [> chunk, V] buffer shows.
    tokens, hidden_size, vocab, chunk = 64, 4, 257, 8
    inputs = make_inputs((tokens,), hidden_size, vocab, torch.float32, bias=True)
    op, shape = _largest_intermediate(_torch_op, inputs, chunk_size=chunk)
    assert torch.Size(shape).numel() <= chunk * vocab, f"{op} made a {shape} tensor; chunk is [{chunk}, {vocab}]"
    # The detector does see the naive path's [tokens, V] logits.
    _, naive_shape = _largest_intermediate(naive_same_dtype, inputs)
    assert torch.Size(naive_shape).numel() >= tokens * vocab


def test_saves_no_logits_for_backward():
    tokens, hidden_size, vocab = 64, 4, 257
    inputs = make_inputs((tokens,), hidden_size, vocab, torch.bfloat16, bias=True)
    saved: list[tuple[int, ...]] = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprobs, entropy = _torch_op(**inputs, chunk_size=16)
    (logprobs.sum() + entropy.sum()).backward()
    assert saved, "the hook saw no saved tensors"
    largest = max(torch.Size(shape).numel() for shape in saved)
    assert largest <= max(tokens * hidden_size, vocab * hidden_size), f"saved shapes: {saved}"
    assert not any(len(shape) == 2 and shape[1] == vocab for shape in saved), f"saved logits: {saved}"
