"""Triton kernels run by the Triton interpreter on CPU (fp32, tiny shapes) against the float64 reference.

The interpreter must be switched on before Triton defines the kernels, so one child process runs every case
(``_interpret_worker.py``) and this module compares its outputs with the reference on the same inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _interpret_cases import CASES, case_inputs
from kernels_testing import assert_verbose_close, reference_outputs_and_grads

pytest.importorskip("triton")

# fp32 tolerances against float64 (tl.dot runs in fp32, "ieee" precision, in the interpreter).
TOLERANCES = [
    pytest.param(torch.float32, {"atol": 1e-5, "rtol": 1e-4}, {"atol": 1e-5, "rtol": 1e-3}, id="fp32"),
]
_HERE = Path(__file__).resolve().parent


# Tile loads: TMA descriptors where the tensors allow them, or plain pointers (LONGCTX_TRITON_TMA=0).
LOADS = {"tma": "1", "pointers": "0"}  # with "tma", LONGCTX_TRITON_GEMM_TMA=1 too


@pytest.fixture(scope="module", params=sorted(LOADS))
def kernel_results(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton_interpret") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(_HERE), *sys.path]),
           "LONGCTX_TRITON_TMA": LOADS[request.param], "LONGCTX_TRITON_GEMM_TMA": LOADS[request.param]}  # fmt: skip
    proc = subprocess.run([sys.executable, str(_HERE / "_interpret_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return torch.load(out)


@pytest.mark.parametrize(("dtype", "value_tol", "grad_tol"), TOLERANCES)
@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[c.id for c in CASES])
def test_matches_float64_reference(kernel_results, case_index, dtype, value_tol, grad_tol):
    case = CASES[case_index]
    data = case_inputs(case, case_index)
    expected = reference_outputs_and_grads(data["inputs"], data["grad_logprobs"], data["grad_entropy"],
                                           **data["options"])  # fmt: skip
    actual = kernel_results[case.id]
    assert actual["logprobs"].dtype == dtype
    for key in ("logprobs", "entropy"):
        assert_verbose_close(actual[key], expected[key], name=f"{case.id}/{key}", **value_tol)
    assert_verbose_close(actual["logprobs_no_grad"], expected["logprobs"], name=f"{case.id}/no-grad", **value_tol)
    for key in ("grad_hidden", "grad_weight", "grad_bias"):
        assert (actual[key] is None) == (expected[key] is None), f"{case.id}/{key}: presence differs"
        if expected[key] is not None:
            assert_verbose_close(actual[key], expected[key], name=f"{case.id}/{key}", **grad_tol)
