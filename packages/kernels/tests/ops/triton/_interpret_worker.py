"""Runs the Triton kernels of every interpreter case under ``TRITON_INTERPRET=1``; saves outputs and grads.

Usage: ``python _interpret_worker.py OUT.pt`` (the test module starts it).
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from _interpret_cases import CASES, case_inputs  # noqa: E402
from kernels_testing import outputs_and_grads  # noqa: E402

from longctx_kernels.ops.triton import selective_logprobs as triton_op  # noqa: E402

SMALL_TILES = {
    "LOGITS_CONFIGS": {torch.float32: triton_op.TileConfig(16, 32, 16, 4, 1)},
    "GEMM_CONFIGS": {torch.float32: triton_op.GemmConfig(16, 32, 16, 4, 1, 2)},
    "ROW_CHUNK": 16,
    "VOCAB_CHUNK": 64,
}
DEFAULT_TILES = {name: getattr(triton_op, name) for name in SMALL_TILES}


def _triton(hidden, weight, targets, *, bias=None, **options):
    return triton_op.selective_logprobs_triton(hidden, weight, targets, bias, return_entropy=True, **options)


def main(out_path: str) -> None:
    results = {}
    for seed, case in enumerate(CASES):
        for name, value in (SMALL_TILES if case.tiles == "small" else DEFAULT_TILES).items():
            setattr(triton_op, name, value)
        data = case_inputs(case, seed)
        result = outputs_and_grads(_triton, data["inputs"], data["grad_logprobs"], data["grad_entropy"],
                                   **data["options"])  # fmt: skip
        with torch.no_grad():
            result["logprobs_no_grad"] = _triton(data["inputs"]["hidden"], data["inputs"]["weight"],
                                                 data["inputs"]["targets"], bias=data["inputs"]["bias"],
                                                 **data["options"])[0]  # fmt: skip
        results[case.id] = result
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
