"""shared_hf_model: one copy of the weights, verified by data pointers, and the same greedy generations."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_QWEN3, greedy_hf, greedy_vllm

import vllm_standby

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(vllm_llm):
    return vllm_standby.shared_hf_model(vllm_llm)


def _vllm_model(llm):
    return llm.apply_model(lambda model: model)[0]


def test_weights_are_views_of_vllm_tensors(vllm_llm, shared):
    vm = _vllm_model(vllm_llm)
    hidden, head_dim = TINY_QWEN3["hidden_size"], TINY_QWEN3["head_dim"]
    q_rows = TINY_QWEN3["num_attention_heads"] * head_dim
    kv_rows = TINY_QWEN3["num_key_value_heads"] * head_dim
    for i, (hl, vl) in enumerate(zip(shared.model.layers, vm.model.layers, strict=True)):
        qkv = vl.self_attn.qkv_proj.weight
        size = qkv.element_size()
        attn = hl.self_attn
        assert attn.q_proj.weight.data_ptr() == qkv.data_ptr(), f"layer {i} q"
        assert attn.k_proj.weight.data_ptr() == qkv.data_ptr() + q_rows * hidden * size, f"layer {i} k"
        assert attn.v_proj.weight.data_ptr() == qkv.data_ptr() + (q_rows + kv_rows) * hidden * size, f"layer {i} v"
        gate_up = vl.mlp.gate_up_proj.weight
        assert hl.mlp.gate_proj.weight.data_ptr() == gate_up.data_ptr()
        inter = TINY_QWEN3["intermediate_size"]
        assert hl.mlp.up_proj.weight.data_ptr() == gate_up.data_ptr() + inter * hidden * gate_up.element_size()
        assert hl.mlp.down_proj.weight.data_ptr() == vl.mlp.down_proj.weight.data_ptr()
        assert hl.input_layernorm.weight.data_ptr() == vl.input_layernorm.weight.data_ptr()
    vocab = TINY_QWEN3["vocab_size"]
    assert shared.lm_head.weight.shape[0] == vocab < vm.lm_head.weight.shape[0]
    assert shared.lm_head.weight.data_ptr() == vm.lm_head.weight.data_ptr()
    assert shared.model.embed_tokens.weight.data_ptr() == vm.model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in shared.parameters())
    assert not any(t.is_meta for t in (*shared.parameters(), *shared.buffers()))


def test_same_greedy_generations(vllm_llm, shared):
    assert greedy_hf(shared) == greedy_vllm(vllm_llm)


def test_in_place_write_reaches_vllm(vllm_llm, shared):
    before = greedy_vllm(vllm_llm)
    weight = shared.model.layers[0].self_attn.k_proj.weight
    saved = weight.clone()
    try:
        with torch.no_grad():
            weight.mul_(-3.0)
        vllm_llm.reset_prefix_cache()
        changed = greedy_vllm(vllm_llm)
        assert changed == greedy_hf(shared)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
        vllm_llm.reset_prefix_cache()
    assert greedy_vllm(vllm_llm) == before
