"""Shared MoE experts: transformers' fused expert parameters as views of vLLM's `w13_weight` / `w2_weight`.

CPU (CI): the names and refusals; a real vLLM CPU engine on a tiny Qwen3-MoE checkpoint, whose CPU MoE kernel
prepacks the experts: refused, naming the backend; past that gate, the prepacked experts fail the content check against
the checkpoint, and with the checkpoint's layout written back every transformers parameter of tiny Qwen3-MoE and
gpt-oss engines is a view of its vLLM tensor, equal to transformers' own load of the checkpoint. GPU: real engines on tiny Qwen3-MoE and gpt-oss checkpoints
(vLLM's Triton MoE kernels), each in a child process: every expert parameter is a view at vLLM's address, vLLM's
teacher-forced log-probs equal the shared transformers model's within bf16 rounding, and an in-place write to a
shared expert changes vLLM's output.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VLLM_DTYPE, _save_char_tokenizer, hf_token_logprobs, run_in_child, vllm_token_logprobs

from vllm_standby.shared_experts import EXPERT_LAYOUTS, expert_layout, hf_module_name, verify_first_expert

# bf16 on both sides (vLLM's fused Triton MoE vs transformers' per-expert matmuls, different summation orders):
# teacher-forced log-probs of the same tokens, max absolute difference.
BF16_LOGP_ATOL = 0.1
PROMPTS = [[5, 17, 9, 30, 12, 8, 40, 41], [7, 7, 60, 3, 88, 20, 19, 2, 44]]

TINY_MOE = {
    "qwen3_moe": {
        "vocab_size": 96, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
        "num_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "norm_topk_prob": True, "pad_token_id": 0, "eos_token_id": 1,
    },
    "gpt_oss": {
        "vocab_size": 96, "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "num_local_experts": 8,
        "num_experts_per_tok": 2, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 256, "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 2.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128},
    },
}  # fmt: skip


def save_tiny_moe(path, model_type: str) -> str:
    """A tiny random MoE checkpoint of `model_type` (bf16 safetensors, weights N(0, 0.1)) in `path`."""
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **TINY_MOE[model_type], initializer_range=0.1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:  # random experts, sinks and biases too (init may leave some at zero)
                param.normal_(0.0, 0.1)
    model.save_pretrained(path)
    _save_char_tokenizer(path)
    return str(path)


def test_vllm_module_names_map_to_transformers():
    gpt_oss = EXPERT_LAYOUTS["gpt_oss"]
    assert hf_module_name("model.layers.3.mlp.experts.routed_experts", None) == "model.layers.3.mlp.experts"
    assert hf_module_name("model.layers.0.mlp.experts.base_layer.routed_experts", None) == "model.layers.0.mlp.experts"
    assert hf_module_name("model.layers.1.self_attn.qkv_proj.base_layer", None) == "model.layers.1.self_attn.qkv_proj"
    assert hf_module_name("model.layers.1.attn.qkv_proj", gpt_oss) == "model.layers.1.self_attn.qkv_proj"
    assert hf_module_name("model.embedding", gpt_oss) == "model.embed_tokens"
    assert (
        hf_module_name("model.layers.1.attn.qkv_proj", EXPERT_LAYOUTS["qwen3_moe"]) == "model.layers.1.attn.qkv_proj"
    )
    with pytest.raises(RuntimeError, match=r"model_type 'mixtral' \(mapped: \['gpt_oss', 'qwen3_moe'\]\)"):
        expert_layout("mixtral")


def test_the_content_check_says_what_it_could_not_compare(tmp_path):
    views = {"m.experts.gate_up_proj": torch.zeros(2, 8, 4), "m.experts.down_proj": torch.zeros(2, 4, 4)}
    assert (
        verify_first_expert(views, "m.experts", str(tmp_path))
        == f"no safetensors checkpoint of {str(tmp_path)!r} found here"
    )
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert verify_first_expert(views, "m.experts", str(tmp_path)).startswith("the checkpoint has neither")
    save_file({"m.experts.gate_up_proj": torch.zeros(2, 8, 4), "m.experts.down_proj": torch.ones(2, 4, 4)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^m\.experts\.down_proj: expert 0 as viewed"):
        verify_first_expert(views, "m.experts", str(tmp_path))
    views["m.experts.down_proj"] += 1
    assert verify_first_expert(views, "m.experts", str(tmp_path)) is None


@pytest.mark.parametrize("model_type", sorted(EXPERT_LAYOUTS))
def test_layouts_match_transformers_expert_shapes(model_type):
    """What each layout declares (transposed or not, biases) against the parameters of transformers' experts: vLLM
    holds w13 as [E, 2I, H] and w2 as [E, H, I]."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **TINY_MOE[model_type])
    with torch.device("meta"):
        experts = transformers.AutoModelForCausalLM.from_config(config).model.layers[0].mlp.experts
    layout = EXPERT_LAYOUTS[model_type]
    params = dict(experts.named_parameters())
    count = config.num_local_experts if model_type == "gpt_oss" else config.num_experts
    inter = config.intermediate_size if model_type == "gpt_oss" else config.moe_intermediate_size
    hidden = config.hidden_size
    w13, w2 = (count, 2 * inter, hidden), (count, hidden, inter)
    if layout.transposed:
        w13, w2 = (count, hidden, 2 * inter), (count, inter, hidden)
    assert tuple(params["gate_up_proj"].shape) == w13 and tuple(params["down_proj"].shape) == w2
    assert ("gate_up_proj_bias" in params) == layout.biases == ("down_proj_bias" in params)


def _engine(model_dir: str):
    import vllm_standby

    return vllm_standby.StandbyLLM(
        model_dir, dtype=VLLM_DTYPE, enforce_eager=True, max_model_len=128, max_num_seqs=4,
        kv_cache_memory_bytes=64 * 2**20, seed=0,
    )  # fmt: skip


def _cpu_engine_refused(model_dir: str) -> None:
    import vllm_standby

    llm = _engine(model_dir)
    with pytest.raises(RuntimeError, match=r"mlp\.experts\.routed_experts: vLLM's CPU MoE kernels re-lay"):
        vllm_standby.shared_hf_model(llm)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build's MoE kernel (on CUDA: test_real_engine_...)")
def test_cpu_engine_prepacks_its_experts_and_is_refused(tmp_path):
    pytest.importorskip("vllm")
    run_in_child(_cpu_engine_refused, save_tiny_moe(tmp_path, "qwen3_moe"))


def _vllm_layout_from_checkpoint(model_dir: str, layer: int, model_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(w13, w2)` of MoE layer `layer` as vLLM's loader lays the checkpoint out (written here from vLLM's loaders, not
    from `EXPERT_LAYOUTS`): Qwen3-MoE stacks each expert's gate then up rows, gpt-oss transposes its fused tensors."""
    from safetensors.torch import load_file

    state = load_file(f"{model_dir}/model.safetensors")
    prefix = f"model.layers.{layer}.mlp.experts"
    if model_type == "gpt_oss":
        return state[f"{prefix}.gate_up_proj"].transpose(1, 2), state[f"{prefix}.down_proj"].transpose(1, 2)
    count = TINY_MOE[model_type]["num_experts"]
    w13 = torch.stack([torch.cat([state[f"{prefix}.{e}.gate_proj.weight"], state[f"{prefix}.{e}.up_proj.weight"]])
                       for e in range(count)])  # fmt: skip
    return w13, torch.stack([state[f"{prefix}.{e}.down_proj.weight"] for e in range(count)])


def _cpu_engine_names_shapes_and_content(model_dir: str, model_type: str) -> None:
    """Past the backend gate (each expert module's backend marked Triton): the CPU kernel's prepacked experts fail the
    content check against the checkpoint; with the checkpoint's layout written back into vLLM's tensors (as a backend
    that keeps it holds them), every transformers parameter is a view of its vLLM tensor with its shape and values."""
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    import vllm_standby

    llm = _engine(model_dir)
    vm = llm.apply_model(lambda model: model)[0]
    experts = [m for m in vm.modules() if "w13_weight" in m._parameters]
    assert len(experts) == TINY_MOE[model_type]["num_hidden_layers"]
    for module in experts:
        module.quant_method.unquantized_backend = UnquantizedMoeBackend.TRITON
    with pytest.raises(
        RuntimeError, match=r"experts\.gate_up_proj: expert 0 as viewed .* differs from the checkpoint"
    ):
        vllm_standby.shared_hf_model(llm)
    with torch.no_grad():
        for index, module in enumerate(experts):
            w13, w2 = _vllm_layout_from_checkpoint(model_dir, index, model_type)
            module.w13_weight.copy_(w13)
            module.w2_weight.copy_(w2)
    hf = vllm_standby.shared_hf_model(llm)
    assert type(hf).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}[model_type]
    for index, module in enumerate(experts):
        layer = hf.model.layers[index].mlp.experts
        assert layer.gate_up_proj.data_ptr() == module.w13_weight.data_ptr()
        assert layer.down_proj.data_ptr() == module.w2_weight.data_ptr()
    assert not any(t.is_meta for t in (*hf.parameters(), *hf.buffers()))
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, param in reference.named_parameters():
        if ".experts." in name:
            assert torch.equal(hf.get_parameter(name), param.to(hf.get_parameter(name).dtype)), name


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build's MoE modules")
@pytest.mark.parametrize("model_type", sorted(EXPERT_LAYOUTS))
def test_cpu_engine_modules_map_by_name_shape_and_content(tmp_path, model_type):
    pytest.importorskip("vllm")
    run_in_child(_cpu_engine_names_shapes_and_content, save_tiny_moe(tmp_path, model_type), model_type)


def _real_engine_shares_experts(model_dir: str, model_type: str) -> None:
    import vllm_standby

    llm = _engine(model_dir)
    hf = vllm_standby.shared_hf_model(llm)
    vm = llm.apply_model(lambda model: model)[0]
    vllm_experts = {n: m for n, m in vm.named_modules() if "w13_weight" in m._parameters}
    assert len(vllm_experts) == TINY_MOE[model_type]["num_hidden_layers"]
    for name, module in vllm_experts.items():
        experts = hf.get_submodule(hf_module_name(name, EXPERT_LAYOUTS[model_type]))
        assert experts.gate_up_proj.data_ptr() == module.w13_weight.data_ptr(), name
        assert experts.down_proj.data_ptr() == module.w2_weight.data_ptr(), name
    storages = {p.untyped_storage().data_ptr() for p in vm.parameters()}
    assert all(p.untyped_storage().data_ptr() in storages for p in hf.parameters()), "a weight is not in vLLM's"
    gap = (vllm_token_logprobs(llm, PROMPTS) - hf_token_logprobs(hf, PROMPTS)).abs().max().item()
    print(f"{model_type}: vLLM vs shared transformers, max log-prob gap {gap:.4f}")
    assert gap < BF16_LOGP_ATOL, f"{model_type}: vLLM and the shared model disagree by {gap:.3f}"
    before = vllm_token_logprobs(llm, PROMPTS)
    experts = hf.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.down_proj.mul_(-4.0)
    llm.reset_prefix_cache()
    moved = (vllm_token_logprobs(llm, PROMPTS) - before).abs().max().item()
    gap = (vllm_token_logprobs(llm, PROMPTS) - hf_token_logprobs(hf, PROMPTS)).abs().max().item()
    assert moved > 10 * BF16_LOGP_ATOL and gap < BF16_LOGP_ATOL, f"in-place write: moved {moved:.3f}, gap {gap:.3f}"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (vLLM's Triton MoE kernels)")
@pytest.mark.parametrize("model_type", sorted(EXPERT_LAYOUTS))
def test_real_engine_shares_its_experts(tmp_path, model_type):
    pytest.importorskip("vllm")
    run_in_child(_real_engine_shares_experts, save_tiny_moe(tmp_path, model_type), model_type)
