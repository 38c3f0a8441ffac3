"""`tools/bench/fp8_rollout.py` on the CPU, before it runs on a GPU: the matmul rows (torch's CPU `_scaled_mm`), the
GRPO run refused by the rollout plan with FP8 on the CPU (recorded as a row, nothing loaded), the rollout rows on
vLLM's CPU build (per-channel FP8, the one scheme it quantizes here), the `all` driver's names and summary table.

Tolerance: the matmul rows' relative error against float64 is at most 1e-2 for bf16 and the dequantized FP8 weight
(bf16 rounding of inputs and outputs), and 2**-4 for `scaled_mm` (e4m3 rounds the activations by at most 2**-4).
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import DISTRIBUTED_ENV

_SPEC = importlib.util.spec_from_file_location(
    "bench_fp8_rollout", Path(__file__).resolve().parents[1] / "tools" / "bench" / "fp8_rollout.py"
)
fp8_rollout = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = fp8_rollout
_SPEC.loader.exec_module(fp8_rollout)


def _last_row(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_matmul_rows_on_the_cpu(capsys):
    fp8_rollout.main(["matmul", "--shapes", "tiny", "--tokens", "32"])
    rows = _last_row(capsys)["rows"]
    assert {(r["layer"], r["provider"]) for r in rows} == {
        (layer, provider)
        for layer in fp8_rollout.TINY_SHAPES
        for provider in ("bf16", "fp8-dequantize", "fp8-scaled_mm")
    }
    for row in rows:
        bound = 2**-4 if row["provider"] == "fp8-scaled_mm" else 1e-2
        assert row["rel_error_vs_float64"] <= bound, row
        assert row["ms"]["p50"] > 0 and row["peak_GiB"] is None  # no allocator peak off CUDA


def test_grpo_with_fp8_on_the_cpu_is_a_refused_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fp8_rollout, "WORK", tmp_path)
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)  # cmd_grpo sets them, as TRL's colocate mode needs
    fp8_rollout.main(["grpo", "--preset", "tiny", "--weights", "per-channel", "--length", "8", "--steps", "1"])
    row = _last_row(capsys)
    assert row["status"] == "refused" and row["weights"] == "per-channel"
    assert row["error"].startswith("vllm_fp8_weights='per-channel': vLLM") and "runs on the CPU" in row["error"]
    assert not (tmp_path / "run-ours-per-channel").exists()  # refused before the trainer made anything


@pytest.mark.slow
def test_rollout_rows_on_vllms_cpu_build(tmp_path, monkeypatch, capsys):
    pytest.importorskip("vllm")
    monkeypatch.setattr(fp8_rollout, "WORK", tmp_path)
    fp8_rollout.main(["rollout", "--preset", "tiny", "--weights", "per-channel", "--seqs", "2", "--tokens", "4",
                      "--repeats", "1"])  # fmt: skip
    row = _last_row(capsys)
    assert row["one_copy"] and row["vllm_weights_GiB"] > 0
    assert all(row[k] > 0 for k in ("tok_s", "tok_s_b2", "tok_s_lora", "tok_s_b2_lora"))
    assert row["logp_gap"]["max"] < 0.25 and row["logp_gap_lora"]["max"] < 0.25  # as tests/test_shared_fp8.py


def test_all_names_its_runs_and_summarizes_rows():
    args = argparse.Namespace(preset="qwen3-1.7b", matmul_shapes="qwen3-8b", length=4096, steps=4)
    runs = fp8_rollout.all_runs(args)
    assert {"matmul", "rollout-bf16", "rollout-per-channel", "grpo-trl", "grpo-per-channel"} <= set(runs)
    assert runs["grpo-per-channel-scaled_mm"][0][:5] == ["grpo", "--weights", "per-channel", "--fp8-matmul",
                                                         "scaled_mm"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"--only takes .* got \['nope'\]"):
        fp8_rollout.main(["all", "--only", "nope"])
    rows = [
        {"name": "grpo-per-channel", "what": "grpo_step", "status": "ok", "s_per_step": 12.5, "device_peak_GiB": 40.0,
         "sampling": {"sampling_logp_difference/mean": [0.02, 0.03], "sampling_logp_difference/max": [0.4, 0.5]}},
        {"name": "grpo-trl", "what": "grpo_step", "status": "refused", "error": "why"},
        {"name": "rollout-bf16", "what": "rollout", "tok_s": 9000.0, "tok_s_lora": 8000.0, "tok_s_b2_lora": 300.0,
         "vllm_weights_GiB": 3.2, "logp_gap": {"mean": 0.01, "max": 0.1}},
    ]  # fmt: skip
    text = fp8_rollout.summary(rows)
    assert "| grpo-per-channel | 12.50 s/step | 40.0 GiB peak | 0.03 | 0.50 |" in text
    assert "| grpo-trl | refused | why |" in text and "| rollout-bf16 | 9000 / 8000 tok/s (b2 300) |" in text


def test_model_folders_are_kept_apart_by_context_length(tmp_path, monkeypatch):
    """The GRPO rows once reused the folder written for the shorter rollouts (one folder per preset), and vLLM refused
    their longer `max_model_len` against its `max_position_embeddings`."""
    import colocate  # tools/bench, on the path since fp8_rollout was loaded

    monkeypatch.setattr(colocate, "WORK", tmp_path)
    short, long = (colocate.model_dir("qwen3-1.7b", n, weights=False) for n in (1288, 4360))
    assert short != long
    for path, n in ((short, 1288), (long, 4360)):
        assert json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"] == n
