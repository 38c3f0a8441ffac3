"""`unquantized_experts_notice` on tiny models loaded by transformers with bitsandbytes' 4-bit config on CPU: a MoE
model's fused experts stay 16-bit and are named; a dense 4-bit model and an unquantized MoE model get no notice."""

import pytest
import torch
import transformers
from testing_utils import EXPERT_INTERMEDIATE, NUM_EXPERTS, moe_config

from trl_longctx.quantized_experts import unquantized_experts_notice
from trl_longctx.tiny_models import build_tiny_qwen3

pytest.importorskip("bitsandbytes")


def load(path, four_bit: bool):
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization if four_bit else None, device_map="cpu", dtype=torch.bfloat16
    )


def test_a_4bit_moe_model_is_told_its_experts_stay_16_bit(tmp_path):
    config = moe_config("qwen3_moe", layers=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = load(tmp_path, four_bit=True)
    notice = unquantized_experts_notice(model)
    hidden = config.hidden_size
    # Per layer: gate_up [E, 2 * I, H] and down [E, H, I].
    expected = 2 * NUM_EXPERTS * (2 * EXPERT_INTERMEDIATE * hidden + hidden * EXPERT_INTERMEDIATE)
    assert notice is not None and f"Its 4 fused Mixture-of-Experts weights ({expected / 1e9:.2f}B" in notice
    assert "stay bfloat16" in notice and "mlp.experts." in notice
    assert unquantized_experts_notice(load(tmp_path, four_bit=False)) is None


def test_a_4bit_dense_model_gets_no_notice(tmp_path):
    build_tiny_qwen3(64, num_hidden_layers=2, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    model = load(tmp_path, four_bit=True)
    assert model.is_loaded_in_4bit and unquantized_experts_notice(model) is None
