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


def test_step_status_names_non_finite_values():
    """A step that ran but computed NaN is not a trained row (`longest` skips it)."""
    assert moe_step.step_status(mean_logp=-12.8, aux_loss=4.06) == "ok"
    assert moe_step.step_status(mean_logp=float("nan"), aux_loss=None) == "non-finite (mean_logp=nan)"
    rows = [
        {"provider": "ours", "L": 64, "status": "ok"},
        {"provider": "ours", "L": 128, "status": moe_step.step_status(mean_logp=float("inf"))},
    ]
    assert moe_step.longest(rows) == {"ours": 64}


def test_qlora_quantization_keeps_the_attention_biases():
    """`--mode qlora` on gpt-oss, whose attention projections have biases: each NF4 layer keeps its layer's bias (a
    `Linear4bit` built on meta left it uninitialized, and the H100 rows computed NaN), and the quantized model's
    logits stay finite and near the bf16 model's.

    Tolerance: NF4 rounds each weight to 16 levels per block of 64 (about 10% relative error per weight); on this
    two-layer model with random weights the logits move by about 0.1 of their norm (seen: 0.11); 0.35 bounds it,
    while NaN logits fail it. The biases are checked by identity (a fresh model's are zeros)."""
    pytest.importorskip("bitsandbytes", reason="the qlora extra of trl_longctx")
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_step.moe_config("gpt-oss-20b", 64, tiny=True), dtype=torch.bfloat16)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
    biases = {name: m.bias.detach().clone() for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m.bias is not None and ".layers." in name}  # fmt: skip
    assert biases, "gpt-oss's attention projections have biases"
    assert moe_step.quantize_decoder_linears(model) >= len(biases)
    for name, bias in biases.items():
        quantized = model.get_submodule(name)
        assert type(quantized).__name__ == "Linear4bit" and quantized.bias.device.type == "cpu", name
        assert torch.equal(quantized.bias.detach(), bias), name
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    assert torch.isfinite(logits).all()
    assert (logits - reference).norm() <= 0.35 * reference.norm()
