"""lora_request: an in-memory PEFT adapter generates exactly like the same adapter merged into the weights."""

from __future__ import annotations

import pytest
import torch
from conftest import LORA_RANK, assert_greedy_equivalent, greedy_hf, greedy_vllm, tiny_qwen3

import vllm_standby
from vllm_standby import lora as lora_module

pytestmark = pytest.mark.slow


def _peft_model(tiny_qwen3_dir, scale: float):
    import peft
    import transformers

    base = transformers.Qwen3ForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=LORA_RANK,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = peft.get_peft_model(base, config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero; make the adapter do something
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model


def test_fresh_id_each_call(tiny_qwen3_dir):
    model = _peft_model(tiny_qwen3_dir, scale=0.1)
    first, second = vllm_standby.lora_request(model), vllm_standby.lora_request(model)
    assert first.lora_int_id != second.lora_int_id and first.lora_name != second.lora_name
    tensors, _ = lora_module.lookup(second.lora_path)
    weight = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert all(t.data_ptr() != weight.data_ptr() for t in tensors.values())  # snapshot, not the live parameters


def test_lora_generation_equals_merged(vllm_llm, tiny_qwen3_dir):
    model = _peft_model(tiny_qwen3_dir, scale=0.3)
    request = vllm_standby.lora_request(model)
    with_lora = greedy_vllm(vllm_llm, lora_request=request)
    merged = model.merge_and_unload()
    assert_greedy_equivalent(merged, with_lora)
    base = greedy_hf(tiny_qwen3(seed=0, initializer_range=0.1))
    assert with_lora != base, "the adapter should change the generations"
    assert greedy_vllm(vllm_llm) == base


def test_unknown_in_memory_path_fails_clearly():
    with pytest.raises(KeyError, match="not registered"):
        lora_module.lookup(f"{lora_module.SCHEME}999999")
    assert lora_module.lookup("/some/dir") is None
