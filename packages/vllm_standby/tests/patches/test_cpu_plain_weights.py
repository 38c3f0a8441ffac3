"""The CPU weight patch (`dispatch_cpu_unquantized_gemm`), on every CPU build it is pinned for: the callers still
reach it, and a real engine keeps plain weights that `load_weights` updates in place."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import PROMPTS, greedy_hf, greedy_vllm, tiny_qwen3
from patch_contract import INSTALLED

from vllm_standby import patches
from vllm_standby.patches import _targets

TARGET = "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm"
SPEC = next((s for s in patches.module_for(INSTALLED).PATCHES if s.target == TARGET), None)
pytestmark = pytest.mark.skipif(SPEC is None, reason=f"vLLM {INSTALLED} gets no CPU weight patch (no CPU build)")


def test_callers_import_target_at_call_time():
    """The patch works because both callers look the function up in the utils module when they run."""
    from vllm.model_executor.layers import linear, vocab_parallel_embedding

    for module, cls in ((linear, "UnquantizedLinearMethod"), (vocab_parallel_embedding, "UnquantizedEmbeddingMethod")):
        source = inspect.getsource(getattr(module, cls).process_weights_after_loading)
        assert "from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm" in source
        assert not hasattr(module, "dispatch_cpu_unquantized_gemm")


def test_replacement_delegates_non_2d_weights():
    calls = []
    replacement = _targets._keep_plain_cpu_weights(lambda layer, remove_weight: calls.append(remove_weight))
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.zeros(4, 1, 3), requires_grad=False)
    replacement(layer, True)
    assert calls == [True]
    layer.weight = torch.nn.Parameter(torch.zeros(4, 3), requires_grad=False)
    replacement(layer, True)
    assert calls == [True] and layer.cpu_linear is torch.nn.functional.linear and layer.weight.shape == (4, 3)


def _vllm_model(llm):
    return llm.apply_model(lambda model: model)[0]


@pytest.mark.slow
def test_engine_keeps_plain_weights(vllm_llm):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the patch is CPU-only")
    model = _vllm_model(vllm_llm)
    linear = model.model.layers[0].self_attn.qkv_proj
    assert linear.weight.shape == (128 + 2 * 64, 128)
    assert hasattr(linear.weight, "weight_loader")
    assert linear.cpu_linear is torch.nn.functional.linear
    assert model.lm_head.cpu_linear is torch.nn.functional.linear


@pytest.mark.slow
def test_load_weights_changes_generation_like_transformers(vllm_llm, tiny_qwen3_dir):
    import transformers

    before_hf = greedy_hf(transformers.Qwen3ForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval())
    assert greedy_vllm(vllm_llm) == before_hf

    new = tiny_qwen3(seed=1, initializer_range=0.1)
    model = _vllm_model(vllm_llm)
    try:
        with torch.no_grad():
            model.load_weights(new.state_dict().items())
        vllm_llm.reset_prefix_cache()  # cached prompt blocks hold KV of the old weights
        after = greedy_vllm(vllm_llm)
        assert after != before_hf
        assert after == greedy_hf(new), "vLLM with updated weights differs from transformers on the same weights"
        torch.testing.assert_close(model.lm_head.weight[: new.config.vocab_size], new.lm_head.weight)
    finally:
        original = transformers.Qwen3ForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
        with torch.no_grad():
            model.load_weights(original.state_dict().items())
        vllm_llm.reset_prefix_cache()
    assert greedy_vllm(vllm_llm) == before_hf
    assert len(PROMPTS) == len(before_hf)
