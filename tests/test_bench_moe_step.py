"""`tools/bench/moe_step.py` on the CPU, before it runs on a GPU: on a two-layer gpt-oss and Qwen3-MoE (LoRA on the
attention and the experts), TRL's path and ours train the same steps and compute the same mean log-prob and router
aux loss on the same tokens (the optimizer's learning rate is 0, so every step sees the same weights).

Tolerances: float32 on the CPU, the same attention (eager / SDPA) on both paths; the log-probs differ by the order
of the lm_head reduction (ours chunked over the vocabulary), the aux loss by the order its router logits are stacked:
1e-4 absolute on a mean log-prob of about -5.5 and an aux loss of about 2.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_moe_step", Path(__file__).resolve().parents[1] / "tools" / "bench" / "moe_step.py"
)
moe_step = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = moe_step
_SPEC.loader.exec_module(moe_step)


@pytest.mark.parametrize("model", moe_step.MODELS)
def test_both_paths_train_and_agree(tmp_path, model):
    pytest.importorskip("trl.kernels.chunked_logprob", reason="TRL's fused lm_head needs TRL 1.16 or later")
    out = tmp_path / "moe_step.json"
    rows = moe_step.main(["--model", model, "--tiny", "--device", "cpu", "--lora-experts", "--lengths", "24", "12",
                          "--prompt-length", "8", "--repeats", "1", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == rows
    assert [(r["provider"], r["L"], r["status"]) for r in rows] == [
        ("trl", 12, "ok"),
        ("ours", 12, "ok"),
        ("trl", 24, "ok"),
        ("ours", 24, "ok"),
    ]
    for length in (12, 24):
        trl, ours = (next(r for r in rows if r["provider"] == p and r["L"] == length) for p in ("trl", "ours"))
        assert ours["mini_batch"] == 2 and ours["mlp_tiles"] == 1
        assert trl["aux_loss"] > 0
        assert abs(trl["mean_logp"] - ours["mean_logp"]) < 1e-4, (trl, ours)
        assert abs(trl["aux_loss"] - ours["aux_loss"]) < 1e-4, (trl, ours)
    assert moe_step.longest(rows) == {"trl": 24, "ours": 24}


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match=r"--model must be one of \['gpt-oss-20b', 'qwen3-30b-a3b'\], got 'mixtral'"):
        moe_step.moe_config("mixtral", 1024)


def test_gpt_oss_positions_cover_the_context():
    """gpt-oss's published YaRN (factor 32 over 4,096 positions) up to 131,072 tokens; beyond, the factor grows so
    that `max_position_embeddings` covers the context (the H200 QLoRA rows go past gpt-oss's own range)."""
    published = moe_step.moe_config("gpt-oss-20b", 131072)
    assert published.max_position_embeddings == 131072 and published.rope_parameters["factor"] == 32.0
    longer = moe_step.moe_config("gpt-oss-20b", 300_000)
    assert longer.rope_parameters["factor"] == 74.0 and longer.max_position_embeddings == 74 * 4096 >= 300_000
