"""Memory planner, Mixture-of-Experts terms: parameter counts, each per-token term and each plan component by hand on
a tiny MoE shape; the Qwen3-30B-A3B and gpt-oss-20b presets against their published configs; `ModelShape.from_config`
on Qwen3-MoE and gpt-oss configs; and the per-token terms against allocation traces of tiny MoE blocks and layers on
CPU (bf16 autocast, transformers' `grouped_mm` experts path, as on CUDA)."""

import weakref
from dataclasses import replace

import pytest

from trl_longctx.memory import PRESETS, TrainSetup, plan_memory
from trl_longctx.memory.moe_terms import (
    adapted_expert_bytes,
    moe_block_bytes_per_token,
    moe_layer_bytes_per_token,
    router_logits_bytes_per_token,
)
from trl_longctx.memory.planner import fewest_mlp_tiles, layer_recompute_bytes_per_token
from trl_longctx.memory.shapes import BF16, FP32, ModelShape

# Against allocation traces (relative error of the predicted bytes per token): the MoE block's terms are derived op
# by op, so they hold to the bytes the trace cannot attribute (small per-row temporaries); the whole layer's also
# depend on when the attention's tensors are freed around the block's peak, as the dense terms do, within the
# planner's accuracy bound (test_planner.TOLERANCE).
TOLERANCES = {"block": 0.05, "layer": 0.10}
# H=8, I=24 (dense MLP), 4 layers of which 1 dense, 2 heads x 4, 1 kv head, V=100; 4 experts of I_e=6, top 2.
TINY_MOE = ModelShape(
    8, 24, 4, 2, 1, 4, 100, qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=6,
    dense_mlp_layers=1,
)  # fmt: skip
TINY_GPT_OSS = replace(TINY_MOE, dense_mlp_layers=0, qk_norm=False, expert_bias=True, expert_activation_tensors=4)


def test_parameter_counts_by_hand():
    # nn.Linear: attention (q 8x8, k 8x4, v 8x4, o 8x8) in 4 layers, the dense MLP (3 x 8x24) in 1.
    assert TINY_MOE.linear_params() == 4 * (64 + 32 + 32 + 64) + 1 * 3 * 192
    # 3 MoE layers: experts 4 x (gate/up 8x12 + down 6x8), router 4x8.
    assert TINY_MOE.moe_params() == 3 * (4 * 3 * 8 * 6 + 4 * 8)
    # gpt-oss-like: 4 MoE layers, expert biases 4 x (12 + 8), router bias 4.
    assert TINY_GPT_OSS.moe_params() == 4 * (4 * 3 * 8 * 6 + 4 * (12 + 8) + 4 * 8 + 4)
    assert TINY_MOE.total_params() == TINY_MOE.linear_params() + TINY_MOE.moe_params() + TINY_MOE.other_params()
    # LoRA r=2 on every nn.Linear: r(in + out) for q, k, v, o in 4 layers, gate, up, down in 1; with the experts,
    # r x E x (in + out) for gate/up (8 + 12) and down (6 + 8) in 3 layers.
    attention, mlp, experts = 2 * (16 + 12 + 12 + 16), 2 * (32 + 32 + 32), 3 * 2 * 4 * (20 + 14)
    assert TINY_MOE.lora_params(2) == 4 * attention + mlp
    assert TINY_MOE.lora_params(2, experts=True) == 4 * attention + mlp + experts
    assert TINY_MOE.moe_layers == 3 and TINY_MOE.dense_layers == 1
    dense = PRESETS["qwen3-8b"]
    assert dense.moe_params() == 0 and dense.lora_params(8) == dense.num_hidden_layers * dense.lora_params_per_layer(8)


# The published config.json values (Hugging Face Hub): Qwen/Qwen3-30B-A3B, openai/gpt-oss-20b (keys the planner
# reads; gpt-oss's quantization_config says MXFP4, which training dequantizes).
QWEN3_30B_A3B_CONFIG = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "tie_word_embeddings": False, "router_aux_loss_coef": 0.001,
}  # fmt: skip
GPT_OSS_20B_CONFIG = {
    "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088,
    "num_local_experts": 32, "num_experts_per_tok": 4, "tie_word_embeddings": False, "router_aux_loss_coef": 0.9,
}  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "config", "billions"),
    [("qwen3-30b-a3b", QWEN3_30B_A3B_CONFIG, 30.53), ("gpt-oss-20b", GPT_OSS_20B_CONFIG, 20.91)],
)
def test_presets_are_the_published_configs(preset, config, billions):
    assert ModelShape.from_config(config) == PRESETS[preset]
    # The models' published sizes: 30.5B (Qwen3-30B-A3B) and 21B (gpt-oss-20b) parameters.
    assert PRESETS[preset].total_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_from_config_reads_transformers_moe_configs():
    transformers = pytest.importorskip("transformers")
    qwen = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=50, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=2, mlp_only_layers=[3],
    )  # fmt: skip
    shape = ModelShape.from_config(qwen)
    # Layers 1, 3, 5 are sparse by the step, 3 is listed dense: experts in layers 1 and 5.
    assert (shape.num_experts, shape.num_experts_per_tok, shape.moe_intermediate_size) == (8, 2, 32)
    assert (shape.moe_layers, shape.dense_layers, shape.intermediate_size, shape.qk_norm) == (2, 4, 96, True)
    gpt_oss = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=50, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    oss = ModelShape.from_config(gpt_oss)
    assert (oss.num_experts, oss.moe_intermediate_size, oss.moe_layers) == (4, 48, 2)
    assert oss.expert_bias and oss.expert_activation_tensors == 4
    with pytest.raises(ValueError, match=r"MoE config \(4 experts\) lacks \['num_experts_per_tok'\]"):
        ModelShape.from_config({**GPT_OSS_20B_CONFIG, "num_local_experts": 4, "num_experts_per_tok": None})


def test_moe_block_bytes_by_hand():
    # H=8, I_e=6, k=2, E=4. Router: fp32 softmax 4E, int64 top-k 8k. Experts saved: expert outputs 2kH, gate/up
    # output 2k(2 I_e), silu(gate) 2k I_e, 27k of indices, routing weights and mask. Dispatch: 3 [S, H] = 3 x 2kH.
    block = moe_block_bytes_per_token(TINY_MOE)
    assert block == {"router": 16 + 16, "experts (saved)": 2 * 2 * (8 + 12 + 6) + 2 * 27, "experts (dispatch)": 96}
    # Trained experts also keep the gathered inputs 2kH and the product 2k I_e for their weight gradients.
    assert moe_block_bytes_per_token(TINY_MOE, trained=True)["experts (saved)"] == 158 + 2 * 2 * (8 + 6)
    # gpt-oss: 4 activation tensors; a fourth [S, H] (its down bias rows) while the experts are not trained.
    oss = moe_block_bytes_per_token(TINY_GPT_OSS)
    assert (oss["experts (saved)"], oss["experts (dispatch)"]) == (2 * 2 * (8 + 12 + 4 * 6) + 54, 4 * 32)
    assert moe_block_bytes_per_token(TINY_GPT_OSS, trained=True)["experts (dispatch)"] == 3 * 32
    # Tiled experts: one tile's experts terms; the router runs untiled.
    tiled = moe_block_bytes_per_token(TINY_MOE, tiles=2)
    assert tiled == {"router": 32, "experts (saved)": 158 / 2, "experts (dispatch)": 48}
    assert moe_block_bytes_per_token(PRESETS["qwen3-8b"]) == {}


def test_moe_layer_bytes_by_hand():
    layer = moe_layer_bytes_per_token(TINY_MOE, "lora")
    # The dense layer's attention half (norms 4H + 4H, SDPA 2(2q + 2kv) + 4 heads, q/k norms 4(q + kv), the attention
    # adapters' bf16 input copies 2(3H + q)); residual and block input; the layer output's gradient and its copy.
    assert layer["saved for backward"] == 64 + 48 + 8 + 48 + 2 * (24 + 8)
    assert layer["forward values"] == 2 * 2 * 8 and layer["gradients"] == 2 * 2 * 8
    assert {k: layer[k] for k in ("router", "experts (saved)", "experts (dispatch)")} == moe_block_bytes_per_token(
        TINY_MOE
    )
    full = moe_layer_bytes_per_token(TINY_MOE, "full")
    assert full["saved for backward"] == 64 + 48 + 8 + 48 + 2 * 8 and full["gradients"] == 2 * 8
    assert full["experts (saved)"] == moe_block_bytes_per_token(TINY_MOE, trained=True)["experts (saved)"]
    lora_experts = moe_layer_bytes_per_token(TINY_MOE, "lora", lora_experts=True)
    assert lora_experts["experts (saved)"] == full["experts (saved)"]
    assert moe_layer_bytes_per_token(TINY_MOE, "lora", tiles=3)["forward values"] == 2 * 2 * 8 + 2 * 8
    # The recompute peak is the larger of the MoE layer and (here: I = 24, 4x the experts' rows) the dense layer.
    dense = layer_recompute_bytes_per_token(replace(TINY_MOE, num_experts=0), "lora")
    assert layer_recompute_bytes_per_token(TINY_MOE, "lora") == dense
    assert sum(dense.values()) > sum(layer.values())
    assert layer_recompute_bytes_per_token(TINY_GPT_OSS, "lora") == moe_layer_bytes_per_token(TINY_GPT_OSS, "lora")


def test_plan_components_by_hand():
    # B = 2, P = 3, L = 5: N = 16 tokens. gpt-oss-like tiny: 4 MoE layers, router softmax 2 x E = 8 bytes per layer
    # and token kept for the aux loss; LoRA on the experts forms adapted weights of 4 x E x H x I_e bf16 values.
    setup = TrainSetup.for_path("ours", 2, 3, 5, lora_rank=2, lora_experts=True)
    plan = plan_memory(TINY_GPT_OSS, setup, activation_scale=1.0)
    components = plan.components
    assert router_logits_bytes_per_token(TINY_GPT_OSS) == 2 * 4 * 4
    assert components["router logits kept for the aux loss"] == 32 * 16
    assert adapted_expert_bytes(TINY_GPT_OSS) == 2 * 4 * 4 * 8 * 6
    assert components["adapted expert weights (LoRA on experts)"] == adapted_expert_bytes(TINY_GPT_OSS)
    assert components["weights"] == BF16 * TINY_GPT_OSS.total_params()
    assert components["LoRA params + AdamW states"] == 3 * FP32 * TINY_GPT_OSS.lora_params(2, experts=True)
    per_token = sum(moe_layer_bytes_per_token(TINY_GPT_OSS, "lora", lora_experts=True).values())
    assert components["recompute working set (1 layer)"] == per_token * 16
    assert plan.phase == "layer recompute"
    quiet = plan_memory(TINY_GPT_OSS, replace(setup, router_aux_loss=False, lora_experts=False), activation_scale=1.0)
    assert "router logits kept for the aux loss" not in quiet.components
    assert "adapted expert weights (LoRA on experts)" not in quiet.components
    # QLoRA quantizes the attention's nn.Linear only: experts and routers stay bf16.
    # bitsandbytes' 4 bits with a float32 scale per 64 weights; nested scales: 8-bit, ~0.127 bits per weight.
    rest = BF16 * (TINY_GPT_OSS.other_params() + TINY_GPT_OSS.moe_params()) + BF16 * 8 * 8
    for nested, scales in ((False, 4 / 64), (True, 0.127 / 8)):
        qlora = replace(setup, mode="qlora", nf4_nested_scales=nested)
        weights = plan_memory(TINY_GPT_OSS, qlora, activation_scale=1.0).components["weights"]
        assert weights == pytest.approx(TINY_GPT_OSS.linear_params() * (0.5 + scales) + rest)


def test_bad_moe_settings_are_refused():
    with pytest.raises(ValueError, match=r"lora_experts must be False with mode='full'"):
        TrainSetup(2, 3, 5, mode="full", lora_experts=True)
    with pytest.raises(ValueError, match=r"lora_experts must be False for a model without experts"):
        plan_memory(PRESETS["qwen3-8b"], TrainSetup(2, 3, 5, lora_experts=True))
    with pytest.raises(ValueError, match=r"moe_intermediate_size must be an integer >= 1, got 0"):
        replace(TINY_MOE, moe_intermediate_size=0)


@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "gpt-oss-20b"])
def test_tiled_experts_shrink_the_step_and_fit_longer(preset):
    shape = PRESETS[preset]
    setup = TrainSetup.for_path("ours", 2, 256, 65536)
    per_token = [sum(layer_recompute_bytes_per_token(shape, "lora", t).values()) for t in (1, 2, 4)]
    assert per_token == sorted(per_token, reverse=True) and per_token[0] > 1.5 * per_token[-1]
    untiled = plan_memory(shape, setup).total
    tiles = fewest_mlp_tiles(shape, setup, untiled * 0.8)
    assert tiles is not None and tiles > 1


# -- Against allocation traces on CPU ------------------------------------------------------------------------------


class LiveBytes:
    """Bytes of tensor storages created and still alive while the mode is on, and their peak since `reset()`."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in out if isinstance(out, (tuple, list)) else [out]:
                    if hasattr(tensor, "untyped_storage"):
                        tracker._track(tensor.untyped_storage())
                return out

        self.mode, self.live, self.bytes, self.peak = Mode(), {}, 0, 0

    def _track(self, storage):
        key = storage.data_ptr()
        if key and key not in self.live:
            self.live[key] = storage.nbytes()
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.bytes -= self.live.pop(key, 0)

    def reset(self):
        self.peak = self.bytes


def traced_backward_bytes(module_forward, hidden: int, tokens: int) -> int:
    """Peak bytes allocated during the backward of a checkpointed `module_forward` on `tokens` bf16 tokens (under bf16
    autocast, as the trainer runs), above what is alive after its forward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    trace = LiveBytes()
    with trace.mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = checkpoint(module_forward, x, use_reentrant=False)
        trace.reset()
        base = trace.bytes
        y.backward(torch.ones_like(y))
    return trace.peak - base


def tiny_moe_model(arch: str, mode: str):
    """A one-layer bf16 MoE model (H=128, I_e=48, E=8, k=2, 4 heads x 32) and the shape the planner sees."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    common = {"hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, "vocab_size": 64, "num_experts_per_tok": 2}  # fmt: skip
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=48, num_experts=8)
        config._attn_implementation = "sdpa"
    else:
        config = transformers.GptOssConfig(**common, intermediate_size=48, num_local_experts=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.requires_grad_(mode == "full")
    if mode != "full":
        experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if mode == "lora_experts" else None
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, target_parameters=experts))
    return model, ModelShape.from_config(config)


def per_token(measure) -> float:
    """Bytes per token: the slope between 256 and 512 tokens (what does not grow with the tokens cancels)."""
    return (measure(512) - measure(256)) / 256


@pytest.mark.parametrize("mode", ["lora", "lora_experts", "full"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_block_terms_match_an_allocation_trace(arch, mode):
    model, shape = tiny_moe_model(arch, mode)
    block = next(m for m in model.modules() if type(m).__name__ in ("Qwen3MoeSparseMoeBlock", "GptOssMLP"))

    def forward(x):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    measured = per_token(lambda n: traced_backward_bytes(forward, shape.hidden_size, n))
    predicted = sum(moe_block_bytes_per_token(shape, trained=mode != "lora").values())
    predicted += BF16 * shape.hidden_size  # the gradient handed to the block's output
    assert abs(measured - predicted) <= TOLERANCES["block"] * measured, (measured, predicted)


@pytest.mark.parametrize("mode", ["lora", "lora_experts", "full"])
def test_layer_terms_match_an_allocation_trace(mode):
    """A whole Qwen3-MoE decoder layer (SDPA attention; gpt-oss's attention runs eager on CPU, which the planner does
    not model)."""
    import torch

    model, shape = tiny_moe_model("qwen3_moe", mode)
    layer = next(m for m in model.modules() if type(m).__name__ == "Qwen3MoeDecoderLayer")
    rotary = next(m for m in model.modules() if type(m).__name__ == "Qwen3MoeRotaryEmbedding")

    def measure(tokens):
        positions = torch.arange(tokens)[None]
        with torch.no_grad():
            cos_sin = rotary(torch.zeros(1, dtype=torch.bfloat16), positions)

        def forward(x):
            return layer(x, position_embeddings=cos_sin, position_ids=positions)

        return traced_backward_bytes(forward, shape.hidden_size, tokens)

    planner_mode = "full" if mode == "full" else "lora"
    predicted = sum(moe_layer_bytes_per_token(shape, planner_mode, lora_experts=mode == "lora_experts").values())
    measured = per_token(measure)
    assert abs(measured - predicted) <= TOLERANCES["layer"] * measured, (measured, predicted)
