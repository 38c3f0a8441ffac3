"""Cases of the interpreter tests, shared by the test module and the subprocess that runs the kernels.

``TRITON_INTERPRET=1`` must be set before Triton defines its kernels, so the kernels run in a child process
(``_interpret_worker.py``) while the test process computes the float64 reference on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kernels_testing import make_inputs


@dataclass(frozen=True)
class Case:
    id: str
    tokens: int
    hidden: int
    vocab: int
    options: dict = field(default_factory=dict)
    bias: bool = False
    weight_grad: bool = False
    entropy_grad: bool = False
    # "small": 16/32-wide tiles, 16 rows and 64 vocabulary columns per chunk, so that every case crosses
    # row-chunk and vocabulary-chunk boundaries; "default": the GPU tile sizes, clipped to the shape.
    tiles: str = "small"
    transposed_hidden: bool = False


CASES = [
    Case("base", 7, 16, 37),
    Case("single-token", 1, 32, 130),
    Case("one-word-vocab", 7, 16, 1),
    Case("odd-33x32x130-temperature", 33, 32, 130, {"temperature": 0.7}),
    Case("softcap", 33, 16, 130, {"softcap": 2.5, "temperature": 1.3}),
    Case("scale-divisor", 33, 16, 130, {"logit_scale": 1.7, "logit_divisor": 0.8}),
    Case("frozen-bias", 33, 32, 130, {}, bias=True),
    Case("trainable-weight", 33, 16, 37, {"temperature": 0.9}, weight_grad=True),
    Case(
        "trainable-weight-bias-all-options-entropy-grad",
        33,
        32,
        130,
        {"temperature": 0.6, "logit_scale": 1.5, "logit_divisor": 2.0, "softcap": 4.0},
        bias=True,
        weight_grad=True,
        entropy_grad=True,
    ),
    Case("frozen-entropy-grad", 33, 16, 130, {"softcap": 3.0}, entropy_grad=True),
    Case("transposed-hidden", 33, 16, 130, {"temperature": 1.2}, transposed_hidden=True),
    Case("default-tiles", 33, 32, 130, {"temperature": 0.7, "softcap": 5.0}, bias=True, tiles="default"),
]

OPTION_DEFAULTS = {"temperature": 1.0, "logit_scale": None, "logit_divisor": None, "softcap": None}


def case_inputs(case: Case, seed: int) -> dict:
    """Same tensors in every process: inputs, upstream gradients, options."""
    torch.manual_seed(seed)
    inputs = make_inputs((case.tokens,), case.hidden, case.vocab, torch.float32, bias=case.bias,
                         weight_requires_grad=case.weight_grad)  # fmt: skip
    if case.transposed_hidden:
        base = inputs["hidden"].detach().t().contiguous().requires_grad_()
        inputs["hidden"] = base.t()  # [N, H] view with strides (1, N)
    if inputs["bias"] is not None:
        inputs["bias"].requires_grad_(case.weight_grad)
    grad_logprobs = torch.randn(case.tokens)
    grad_entropy = torch.randn(case.tokens) if case.entropy_grad else None
    return {"inputs": inputs, "grad_logprobs": grad_logprobs, "grad_entropy": grad_entropy,
            "options": {**OPTION_DEFAULTS, **case.options}}  # fmt: skip
