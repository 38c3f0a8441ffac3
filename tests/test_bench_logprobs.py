"""`tools/bench/logprobs.py` on the CPU, before it runs on a GPU: every provider that runs here (ours on the torch
backend, the materialized path, TRL's fused lm_head with and without entropy) scores the same tokens as a float64
reference, in the accuracy rows the bench writes.

Tolerances: the providers take the same bf16 hidden states and weight and multiply them in bf16 (each logit rounded
to bf16 once, the error that dominates here); so every provider's largest log-prob error against float64 lies within
1e-3 of the materialized path's, and its gradient's relative error within 1e-3 of it.
The entropy (TRL's, with `+ent`) is within 5% of float64's per token (bf16 logits of standard deviation about 3).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_logprobs", Path(__file__).resolve().parents[1] / "tools" / "bench" / "logprobs.py"
)
logprobs = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = logprobs
_SPEC.loader.exec_module(logprobs)


def test_accuracy_rows_of_every_cpu_provider_agree(tmp_path):
    pytest.importorskip("trl.kernels.chunked_logprob", reason="TRL's fused lm_head needs TRL 1.16 or later")
    out = tmp_path / "logprobs.json"
    providers = ["materialized", "ours-torch", "trl-fused", "trl-fused+ent"]
    logprobs.main(["--device", "cpu", "--heads", "tiny", "--no-speed", "--accuracy", "--providers", *providers,
                   "--out", str(out)])  # fmt: skip
    rows = {row["provider"]: row for row in json.loads(out.read_text())["rows"] if row.get("metric") == "error"}
    assert set(rows) == set(providers)
    reference = rows["materialized"]
    assert reference["max_abs_logprob"] < 0.1 and reference["grad_rel"] < 0.01
    for provider in providers:
        assert abs(rows[provider]["max_abs_logprob"] - reference["max_abs_logprob"]) < 1e-3, rows[provider]
        assert abs(rows[provider]["grad_rel"] - reference["grad_rel"]) < 1e-3, rows[provider]
    assert rows["trl-fused+ent"]["entropy_max_rel"] < 0.05
