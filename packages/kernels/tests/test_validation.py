"""Every bad input raises a TypeError/ValueError whose message names the argument."""

from __future__ import annotations

import math

import pytest
import torch

from longctx_kernels import selective_logprobs

VOCAB, HIDDEN = 11, 8


def _good() -> dict:
    return {
        "hidden": torch.randn(2, 3, HIDDEN),
        "weight": torch.randn(VOCAB, HIDDEN),
        "targets": torch.randint(0, VOCAB, (2, 3)),
    }


# (id, changes to the good call, expected exception, regex the message must match)
BAD_INPUTS = [
    ("hidden-not-tensor", {"hidden": [[1.0] * HIDDEN]}, TypeError, "hidden must be a torch.Tensor"),
    ("hidden-0d", {"hidden": torch.tensor(1.0), "targets": torch.tensor(0)}, ValueError, r"hidden must have shape"),
    ("hidden-dim-mismatch", {"hidden": torch.randn(2, 3, HIDDEN + 1)}, ValueError, r"hidden last dim .*weight"),
    ("weight-1d", {"weight": torch.randn(HIDDEN)}, ValueError, r"weight must be 2-D"),
    ("weight-3d", {"weight": torch.randn(1, VOCAB, HIDDEN)}, ValueError, r"weight must be 2-D"),
    ("dtype-mismatch", {"weight": torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)}, TypeError, r"weight dtype"),
    (
        "unsupported-dtype",
        {"hidden": torch.randn(2, 3, HIDDEN).double(), "weight": torch.randn(VOCAB, HIDDEN).double()},
        TypeError,
        r"hidden dtype must be one of .*float32",
    ),
    ("targets-float", {"targets": torch.zeros(2, 3)}, TypeError, r"targets must be an integer tensor"),
    ("targets-bool", {"targets": torch.zeros(2, 3, dtype=torch.bool)}, TypeError, r"targets must be an integer"),
    ("targets-shape", {"targets": torch.zeros(6, dtype=torch.long)}, ValueError, r"targets shape .*\(2, 3\)"),
    ("targets-negative", {"targets": torch.full((2, 3), -1)}, ValueError, r"targets values must be in \[0, V\)"),
    ("targets-too-big", {"targets": torch.full((2, 3), VOCAB)}, ValueError, r"targets values .*\[0, 11\)"),
    ("bias-shape", {"bias": torch.randn(VOCAB + 1)}, ValueError, r"bias must have shape \[V\]"),
    ("bias-2d", {"bias": torch.randn(1, VOCAB)}, ValueError, r"bias must have shape"),
    ("bias-dtype", {"bias": torch.randn(VOCAB).half()}, TypeError, r"bias dtype"),
    ("bias-not-tensor", {"bias": 0.5}, TypeError, r"bias must be a torch.Tensor"),
    ("temperature-zero", {"temperature": 0.0}, ValueError, r"temperature must be > 0"),
    ("temperature-negative", {"temperature": -1.0}, ValueError, r"temperature must be > 0"),
    ("temperature-nan", {"temperature": math.nan}, ValueError, r"temperature must be finite"),
    ("temperature-inf", {"temperature": math.inf}, ValueError, r"temperature must be finite"),
    ("temperature-str", {"temperature": "1"}, TypeError, r"temperature must be a real number"),
    ("softcap-zero", {"softcap": 0.0}, ValueError, r"softcap must be > 0"),
    ("softcap-negative", {"softcap": -30.0}, ValueError, r"softcap must be > 0"),
    ("divisor-zero", {"logit_divisor": 0}, ValueError, r"logit_divisor must be non-zero"),
    ("scale-inf", {"logit_scale": math.inf}, ValueError, r"logit_scale must be finite"),
    ("chunk-zero", {"chunk_size": 0}, ValueError, r"chunk_size must be a positive int"),
    ("chunk-negative", {"chunk_size": -4}, ValueError, r"chunk_size must be a positive int"),
    ("chunk-float", {"chunk_size": 2.0}, TypeError, r"chunk_size must be a positive int"),
    ("backend-unknown", {"backend": "cuda"}, ValueError, r"backend must be one of \('auto', 'torch', 'triton'\)"),
    ("devices", {"targets": torch.zeros(2, 3, dtype=torch.long, device="meta")}, ValueError, r"one device"),
]


@pytest.mark.parametrize("changes, error, match", [p[1:] for p in BAD_INPUTS], ids=[p[0] for p in BAD_INPUTS])
def test_bad_input_message(changes, error, match):
    with pytest.raises(error, match=match):
        selective_logprobs(**{**_good(), **changes})


def test_good_input_passes():
    assert selective_logprobs(**_good(), bias=torch.randn(VOCAB), logit_divisor=-2, softcap=1).shape == (2, 3)
