"""Memory planner: each formula by hand on a tiny model, `longest_completion` at its boundary and bounded by host
memory, `auto_chunk_sizes` properties, config.json input. (Against the measured peaks: `tests/test_planner_fit.py` at
the repository root; `longctx-grpo plan`: `test_plan_cli.py`.)"""

import json
import warnings
from dataclasses import replace

import pytest

from trl_longctx.memory import PRESETS, TrainSetup, load_model_shape, longest_completion, plan_memory
from trl_longctx.memory.planner import (
    ChunkSizes,
    auto_chunk_sizes,
    checkpoint_inputs_on_gpu,
    default_logit_chunk_tokens,
    final_norm_backward_bytes_per_token,
    layer_recompute_bytes_per_token,
    lora_dropout_bytes_per_token,
)
from trl_longctx.memory.shapes import FP32, GIB, ModelShape, VisionShape, vision_saved_bytes_per_patch

QWEN3_8B = PRESETS["qwen3-8b"]
# H=8, I=24, 4 layers, 2 heads x 4 (q=8), 1 kv head (kv=4), V=100, Qwen3's q/k norms.
TINY = ModelShape(8, 24, 4, 2, 1, 4, 100, tie_word_embeddings=False, qk_norm=True)
TOLERANCE = 0.10


def test_parameter_counts_by_hand():
    # Per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate and up 8x24, down 24x8.
    assert TINY.linear_params() == 4 * (64 + 32 + 32 + 64 + 192 + 192 + 192)
    # lm_head and embeddings 2 x 100 x 8; two norms of 8 and q/k norms of 4 per layer; the final norm.
    assert TINY.other_params() == 1600 + 4 * 16 + 4 * 8 + 8
    # r x (in + out) per linear, r = 2.
    assert TINY.lora_params_per_layer(2) == 2 * (16 + 12 + 12 + 16 + 32 + 32 + 32)
    # Qwen3-8B: 8.19e9 parameters, 15.26 GiB in bf16.
    assert (QWEN3_8B.linear_params() + QWEN3_8B.other_params()) * 2 / GIB == pytest.approx(15.26, abs=0.01)


def test_layer_recompute_bytes_by_hand():
    lora = layer_recompute_bytes_per_token(TINY, "lora")
    # fp32 norm inputs 4H + 4H; SDPA q, k, v, out 2(2q + 2kv); logsumexp 4 x heads; q/k norms 4(q + kv);
    # gate, up, silu 3 x 2I; bf16 adapter input copies 2(3H + q + 2H).
    assert lora["saved for backward"] == 64 + 48 + 8 + 48 + 144 + 96
    assert lora["forward values"] == 2 * (8 + 8 + 8) + 2 * 24  # residual, MLP input, down output; product
    assert lora["adapter cast"] == 4 * 24 + 2 * 24  # the down input in fp32 and its bf16 copy
    assert lora["gradients"] == 2 * 8 + 2 * 8  # layer output and its LoRA-scaled copy
    for mode in ("qlora", "full"):
        other = layer_recompute_bytes_per_token(TINY, mode)
        assert other["saved for backward"] == 64 + 48 + 8 + 48 + 144 + 2 * (8 + 24)  # + q/k/v input, product
        assert other["gradients"] == 2 * 8 + 3 * 2 * 24
        assert other["adapter cast"] == other["forward values"] == 0
    no_qk = layer_recompute_bytes_per_token(ModelShape(**{**TINY.__dict__, "qk_norm": False}), "lora")
    assert sum(lora.values()) - sum(no_qk.values()) == 4 * (8 + 4)
    # Qwen3-8B: 41.0 layer inputs' worth of bytes per token.
    assert sum(layer_recompute_bytes_per_token(QWEN3_8B).values()) == 336_000
    assert final_norm_backward_bytes_per_token(TINY) == 6 * 4 * 8


def test_flex_attention_with_sinks_is_linear_in_the_length():
    # Our flex attention with sinks (`trl_longctx.attention`) saves the sink factor twice: fp32 (sigmoid's output)
    # and bf16 (the product's input), 6 x heads bytes per token more than SDPA; no term grows faster than the tokens.
    for mode in ("lora", "qlora", "full"):
        sdpa = layer_recompute_bytes_per_token(TINY, mode)
        flex = layer_recompute_bytes_per_token(TINY, mode, attention="longctx_flex")
        assert sum(flex.values()) - sum(sdpa.values()) == 6 * TINY.num_attention_heads
    recompute = "recompute working set (1 layer)"
    plans = {}
    for attention in ("sdpa", "longctx_flex"):
        for length in (1000, 2000, 4000):
            setup = TrainSetup.for_path("ours", 2, 0, length, attention=attention, lora_rank=2)
            plans[attention, length] = plan_memory(TINY, setup, activation_scale=1.0).components[recompute]
        assert plans[attention, 4000] == 2 * plans[attention, 2000] == 4 * plans[attention, 1000]
    assert plans["longctx_flex", 1000] - plans["sdpa", 1000] == 6 * TINY.num_attention_heads * 2 * 1000
    with pytest.raises(ValueError, match=r"attention must be one of \['sdpa', 'longctx_flex'\], got 'eager'"):
        TrainSetup(2, 0, 100, attention="eager")
    # The planner sizes the pass for it: never a larger mini batch than for SDPA, a smaller one in some band of memory.
    batches = {
        attention: [
            auto_chunk_sizes(TINY, free, 4, 0, 1000, attention=attention, lora_rank=2, margin=0).grpo_mini_batch
            for free in (int(1.01**i) for i in range(1100, 1500))
        ]
        for attention in ("sdpa", "longctx_flex")
    }
    pairs = list(zip(batches["longctx_flex"], batches["sdpa"], strict=True))
    assert all(flex <= sdpa for flex, sdpa in pairs) and any(flex < sdpa for flex, sdpa in pairs)


@pytest.mark.parametrize(
    ("layers", "mode", "offload", "expected"),
    [
        (4, "lora", False, (4, 4)),
        (4, "lora", True, (3, 2)),  # recomputed + prefetched + embedding output (autograd leaf); last + leaf
        (4, "full", True, (2, 1)),  # no `enable_input_require_grads` leaf without PEFT
        (2, "lora", True, (2, 2)),
        (1, "lora", True, (1, 1)),
    ],
)
def test_checkpoint_inputs_on_gpu(layers, mode, offload, expected):
    shape = ModelShape(**{**TINY.__dict__, "num_hidden_layers": layers})
    assert checkpoint_inputs_on_gpu(shape, mode, offload) == expected


def test_plan_components_by_hand():
    # B = 2, P = 3, L = 5: N = 16 tokens, N_p = 10; a layer input is 16 x 8 x 2 = 256 bytes.
    setup = TrainSetup.for_path("ours", 2, 3, 5, lora_rank=2)
    plan = plan_memory(TINY, setup, activation_scale=1.0)
    weights, lora = (3072 + 1704) * 2, 4 * 304 * 3 * 4
    expected = {
        "weights": weights,
        "LoRA params + AdamW states": lora,
        "LoRA grads (layers done)": 2 * 304 * 4,  # layers 3 and 2 done, peak at layer 1
        "checkpointed layer inputs on GPU": 3 * 256,
        "recompute working set (1 layer)": 680 * 16,
        "rotary tables": 2 * 8 * 4 * 2,  # cos and sin [T, head_dim] bf16
    }
    assert plan.phase == "layer recompute"
    assert plan.components == pytest.approx(expected)
    # The log-prob step: final norm input (4H) and last hidden state (2H) per token, the copied hidden rows and
    # stored gradient (2H each per predicted token), five fp32 per-token vectors; a 10 x 128 bf16 tile, a 10 x 8
    # fp32 accumulator and 10 x 4 fp32 tile statistics.
    log_prob = 16 * (32 + 16) + 10 * (16 + 16) + 10 * 20 + (2 * 10 * 128 + 4 * 10 * (8 + 4))
    phase_b = weights + lora + 2 * 256 + log_prob + 128
    assert plan.phases == pytest.approx({"layer recompute, mini-batch 0": sum(expected.values()),
                                         "log-prob step, mini-batch 0": phase_b})  # fmt: skip
    # TRL's path keeps every layer input; its 32768-wide bf16 tile dominates such a tiny model.
    trl = plan_memory(TINY, TrainSetup.for_path("trl", 2, 3, 5, lora_rank=2), activation_scale=1.0)
    assert trl.phase == "log-prob step"
    trl_activations = 16 * 32 + 10 * 16 * 4 + 10 * 28  # norm input; hidden rows, fp32 grad, bf16 grad; vectors
    assert trl.allocated == pytest.approx(weights + lora + 4 * 256 + trl_activations + 2 * 10 * 32768 + 128)
    materialized = plan_memory(TINY, TrainSetup.for_path("materialized", 2, 3, 5, lora_rank=2), activation_scale=1.0)
    assert materialized.phases["log-prob step, mini-batch 0"] == pytest.approx(
        weights + lora + 4 * 256 + 16 * 48 + 8 * 10 * 100 + 128
    )


def test_mini_batches_by_hand():
    # 4 sequences in 2 mini-batches of 2; the second is back-propagated first, while the first waits with its
    # last layer input and embedding output (2 x 256 bytes), its final norm input (16 x 32) and its log-prob
    # kernel's hidden rows and stored gradient (2 x 10 x 16).
    setup = TrainSetup.for_path("ours", 4, 3, 5, lora_rank=2, grpo_mini_batch=2)
    assert setup.mini_batches() == [2, 2]
    plan = plan_memory(TINY, setup, activation_scale=1.0)
    static = (3072 + 1704) * 2 + 4 * 304 * 3 * 4
    first_back = static + 2 * 304 * 4 + 3 * 256 + 680 * 16 + 2 * 256 + 16 * 32 + 2 * 10 * 16 + 2 * 128
    # Then the first mini-batch alone, with every layer's gradient from the one before.
    second_back = static + 4 * 304 * 4 + 3 * 256 + 680 * 16 + 128
    assert plan.phases["layer recompute, mini-batch 1"] == pytest.approx(first_back)
    assert plan.phases["layer recompute, mini-batch 0"] == pytest.approx(second_back)
    assert TrainSetup(5, 3, 5, grpo_mini_batch=2).mini_batches() == [2, 2, 1]
    with pytest.raises(ValueError, match="grpo_mini_batch must be <= num_generations"):
        TrainSetup(2, 3, 5, grpo_mini_batch=3)


def test_longest_completion_is_the_boundary():
    setup = TrainSetup.for_path("ours", 2, 256, 8192)
    longest = longest_completion(QWEN3_8B, setup, 80)
    assert longest % 256 == 0 and longest > 0
    fits = plan_memory(QWEN3_8B, TrainSetup.for_path("ours", 2, 256, longest)).total
    too_long = plan_memory(QWEN3_8B, TrainSetup.for_path("ours", 2, 256, longest + 256)).total
    assert fits <= 80 * GIB < too_long
    assert longest_completion(QWEN3_8B, setup, 1) == 0
    totals = {mode: plan_memory(QWEN3_8B, TrainSetup(2, 256, 8192, mode=mode)).total for mode in ("lora", "qlora")}
    assert totals["qlora"] < totals["lora"] < plan_memory(QWEN3_8B, TrainSetup(2, 256, 8192, mode="full")).total


def _need(shape, sizes, free_args, resident_adam=False):
    """Predicted bytes the step needs above what is resident, for the sizes `auto_chunk_sizes` picked."""
    setup = TrainSetup(*free_args, grpo_mini_batch=sizes.grpo_mini_batch, logit_chunk_tokens=sizes.logit_chunk_tokens,
                       logprob_backend="torch")  # fmt: skip
    resident = (shape.linear_params() + shape.other_params()) * 2
    resident += shape.num_hidden_layers * shape.lora_params_per_layer(32) * (12 if resident_adam else 4)
    return plan_memory(shape, setup).allocated - resident


@pytest.mark.parametrize(
    ("backend", "args", "free_gib"),
    [
        ("torch", (8, 256, 16384), range(14, 160, 3)),  # the decoder's recompute sets the peak
        ("triton", (8, 256, 16384), range(14, 160, 3)),
        ("torch", (6, 0, 256), [1.0 + k / 96 for k in range(64)]),  # the torch backend's logit chunk sets it
    ],
)
def test_auto_chunk_sizes_monotone_in_free_memory(backend, args, free_gib):
    previous = (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the smallest amounts fit nothing
        for gib in free_gib:
            sizes = auto_chunk_sizes(QWEN3_8B, gib * GIB, *args, logprob_backend=backend)
            assert sizes.grpo_mini_batch >= previous[0] and sizes.logit_chunk_tokens >= previous[1], (gib, sizes)
            previous = sizes
    assert previous == (args[0], default_logit_chunk_tokens(QWEN3_8B.vocab_size), 1)


def test_auto_chunk_sizes_fit_with_margin_and_are_the_largest():
    args = (12, 256, 8192)
    for gib in (12, 20, 30, 45, 70):
        sizes = auto_chunk_sizes(QWEN3_8B, gib * GIB, *args, logprob_backend="torch", margin=0.1)
        assert args[0] % sizes.grpo_mini_batch == 0
        assert _need(QWEN3_8B, sizes, args) * 1.1 <= gib * GIB
        larger = [d for d in range(sizes.grpo_mini_batch + 1, 13) if 12 % d == 0]
        if larger:
            bigger = sizes._replace(grpo_mini_batch=larger[0])
            assert _need(QWEN3_8B, bigger, args) * 1.1 > gib * GIB


def test_auto_chunk_sizes_shrink_the_chunk_last_and_never_return_zero():
    # Short sequences: the torch backend's [chunk, V] buffers (12 B per logit, 0.43 GiB at 256 rows) set the peak;
    # with less free memory than any mini-batch needs at the full chunk, the chunk shrinks at mini-batch 1.
    args, cap = (6, 0, 256), default_logit_chunk_tokens(QWEN3_8B.vocab_size)
    at_cap = min(_need(QWEN3_8B, ChunkSizes(d, cap), args) for d in (1, 2, 3, 6))
    tight = auto_chunk_sizes(QWEN3_8B, at_cap - 1, *args, logprob_backend="torch", margin=0.0)
    assert tight.grpo_mini_batch == 1 and 1 <= tight.logit_chunk_tokens < cap
    assert _need(QWEN3_8B, tight, args) <= at_cap - 1 < _need(QWEN3_8B, tight._replace(
        logit_chunk_tokens=2 * tight.logit_chunk_tokens), args)  # fmt: skip
    with pytest.warns(UserWarning, match="No chunk sizes fit"):
        assert auto_chunk_sizes(QWEN3_8B, 1.0, 6, 256, 4096) == (1, 1, 1)
    for n in (1, 3, 6, 7):
        sizes = auto_chunk_sizes(QWEN3_8B, 200 * GIB, n, 256, 1024)
        assert sizes.grpo_mini_batch == n and sizes.logit_chunk_tokens >= 1
    # Once AdamW's states exist they are resident, so the same free memory fits as much or more.
    before = auto_chunk_sizes(QWEN3_8B, 30 * GIB, 8, 256, 16384)
    after = auto_chunk_sizes(QWEN3_8B, 30 * GIB, 8, 256, 16384, optimizer_states_allocated=True)
    assert after.grpo_mini_batch >= before.grpo_mini_batch


def test_auto_chunk_sizes_takes_a_transformers_config():
    config = {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}  # fmt: skip
    transformers = pytest.importorskip("transformers")
    from_object = auto_chunk_sizes(transformers.Qwen3Config(**config), 40 * GIB, 8, 256, 16384)
    assert from_object == auto_chunk_sizes(config, 40 * GIB, 8, 256, 16384)
    assert from_object == auto_chunk_sizes(QWEN3_8B, 40 * GIB, 8, 256, 16384)


def test_default_logit_chunk_matches_the_kernels():
    from longctx_kernels import default_chunk_size

    for vocab in (1, 1000, 128256, 151936, 2**28):
        assert default_logit_chunk_tokens(vocab) == default_chunk_size(vocab)


def test_config_json_matches_preset(tmp_path):
    config = {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model_shape(str(tmp_path)) == QWEN3_8B
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks"):
        load_model_shape(str(tmp_path))


def test_mlp_tiles_shrink_the_recompute_and_never_go_below_min_tile_tokens():
    """Tiling divides the MLP's per-token terms: the predicted peak falls with more tiles, towards the attention's
    share; `mlp_tile_counts` keeps tiles of at least `MIN_TILE_TOKENS` tokens."""
    from trl_longctx.memory.planner import MIN_TILE_TOKENS, layer_recompute_bytes_per_token, mlp_tile_counts

    for mode in ("lora", "qlora", "full"):
        per_token = [sum(layer_recompute_bytes_per_token(QWEN3_8B, mode, t).values()) for t in (1, 2, 3, 8)]
        assert per_token == sorted(per_token, reverse=True) and per_token[0] > 1.5 * per_token[-1], mode
    assert mlp_tile_counts(MIN_TILE_TOKENS - 1) == [1]
    counts = mlp_tile_counts(2 * (256 + 131072))
    assert counts[0] == 1 and counts[1] == 2 and 2 * (256 + 131072) // counts[-1] >= MIN_TILE_TOKENS


def test_auto_chunk_sizes_tile_only_when_untiled_does_not_fit():
    args = (2, 256, 131072)
    # Plenty of memory: untiled, both sequences in one pass.
    cap = default_logit_chunk_tokens(QWEN3_8B.vocab_size)
    assert auto_chunk_sizes(QWEN3_8B, 300 * GIB, *args, tile_mlps=True) == (2, cap, 1)
    # Between "one sequence untiled" and "two": the mini-batch halves before any tiling.
    one_untiled = auto_chunk_sizes(QWEN3_8B, 300 * GIB, *args, grpo_mini_batch=1)
    assert one_untiled.tiled_mlp_chunks == 1
    # An H100's worth: untiled does not fit even one sequence, tiles do (the fewest that fit).
    sizes = auto_chunk_sizes(QWEN3_8B, 30 * GIB, *args, tile_mlps=True, mode="qlora")
    assert sizes.tiled_mlp_chunks > 1
    fewer = TrainSetup(*args, mode="qlora", grpo_mini_batch=sizes.grpo_mini_batch,
                       tiled_mlp_chunks=sizes.tiled_mlp_chunks - 1)  # fmt: skip
    assert plan_memory(QWEN3_8B, fewer).allocated > plan_memory(
        QWEN3_8B, replace(fewer, tiled_mlp_chunks=sizes.tiled_mlp_chunks)).allocated  # fmt: skip
    # Without `tile_mlps` nothing is tiled, whatever the memory.
    with pytest.warns(UserWarning, match="No chunk sizes fit"):
        assert auto_chunk_sizes(QWEN3_8B, 20 * GIB, *args, mode="qlora").tiled_mlp_chunks == 1


def test_longest_completion_with_tiling_is_longer():
    setup = TrainSetup.for_path("ours", 2, 256, 1024, mode="qlora")
    untiled = longest_completion(QWEN3_8B, setup, 79.2)
    tiled = longest_completion(QWEN3_8B, setup, 79.2, tile_mlps=True)
    assert tiled > untiled > 0


def test_pinned_host_bytes_by_hand_and_bound_the_longest_completion():
    """Every offloaded layer input but the last, of every sequence: `(layers - 1) * B * T * 2H`; nothing without
    offload; a host limit shortens the longest completion to what can be pinned."""
    from trl_longctx.memory.planner import pinned_host_bytes

    setup = TrainSetup.for_path("ours", 2, 3, 5, lora_rank=2)
    assert pinned_host_bytes(TINY, setup) == 3 * 2 * 8 * 2 * 8
    assert pinned_host_bytes(QWEN3_8B, TrainSetup.for_path("trl", 2, 256, 4096)) == 0
    setup = TrainSetup.for_path("ours", 2, 256, 1024, mode="qlora")
    unlimited = longest_completion(QWEN3_8B, setup, 79.2, tile_mlps=True)
    limited = longest_completion(QWEN3_8B, setup, 79.2, tile_mlps=True, host_memory_gib=109.0)
    assert limited < unlimited
    assert pinned_host_bytes(QWEN3_8B, replace(setup, completion_length=limited)) <= 109 * GIB
    assert pinned_host_bytes(QWEN3_8B, replace(setup, completion_length=limited + 256)) > 109 * GIB


# Hv = 4, 3 blocks, one merger, 3 x 2 x 2 x 2 = 24 pixel values per patch.
TINY_VL = replace(TINY, vision=VisionShape(hidden_size=4, depth=3, mergers=1, patch_dim=24))


def test_vision_saved_bytes_by_hand():
    # bf16 block inputs 3 x 2Hv; the merger's fp32 norm input 4Hv and three bf16 MLP tensors of Hv per patch (the
    # MLP runs over patches / 4 rows of 4Hv); the bf16 patch pixels.
    assert vision_saved_bytes_per_patch(TINY_VL.vision) == 3 * 8 + (16 + 3 * 8) + 2 * 24
    deepstack = VisionShape(hidden_size=4, depth=3, mergers=3, patch_dim=24)
    assert vision_saved_bytes_per_patch(deepstack) - vision_saved_bytes_per_patch(TINY_VL.vision) == 2 * 40


def test_vision_tower_term_by_hand():
    # 4 sequences in mini-batches of 2, 7 patches per sequence: while the second mini-batch is back-propagated, the
    # tower keeps what it saved for all four sequences; then for the first two. A frozen tower keeps nothing.
    setup = TrainSetup.for_path("ours", 4, 3, 5, lora_rank=2, grpo_mini_batch=2, vision_patches=7)
    per_sequence = vision_saved_bytes_per_patch(TINY_VL.vision) * 7
    frozen, text_only = plan_memory(TINY_VL, setup, activation_scale=1.0), plan_memory(TINY, setup)
    assert frozen.phases == pytest.approx(plan_memory(TINY, setup, activation_scale=1.0).phases)
    assert "vision tower saved tensors" not in frozen.components and text_only.allocated > 0
    trained = plan_memory(TINY_VL, replace(setup, vision_trained=True), activation_scale=1.0)
    for phase in ("layer recompute", "log-prob step"):
        added = {
            j: trained.phases[f"{phase}, mini-batch {j}"] - frozen.phases[f"{phase}, mini-batch {j}"] for j in (0, 1)
        }
        assert added == pytest.approx({1: 4 * per_sequence, 0: 2 * per_sequence})
    assert trained.components["vision tower saved tensors"] == pytest.approx(4 * per_sequence)
    with pytest.raises(ValueError, match=r"vision_patches=7 with vision_trained=True, but the model shape has no"):
        plan_memory(TINY, replace(setup, vision_trained=True))
    with pytest.raises(ValueError, match="vision_patches must be an integer >= 0"):
        TrainSetup(2, 3, 5, vision_patches=-1)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_model_shape_of_a_vision_language_config(family):
    pytest.importorskip("PIL")
    from trl_longctx.tiny_vl_models import build_tiny_vl_model, build_vl_tokenizer

    model = build_tiny_vl_model(family, build_vl_tokenizer())
    config = model.config
    shape = ModelShape.from_config(config)
    assert (shape.hidden_size, shape.num_hidden_layers, shape.vocab_size) == (64, 2, len(build_vl_tokenizer()))
    patch = 14 if family == "qwen2_5_vl" else 16
    mergers = 1 if family == "qwen2_5_vl" else 3  # Qwen3-VL: one deepstack merger per vision block here
    # The tower's parameters and its LoRA adapters ("all-linear"), counted from the config, equal the built tower's
    # (exact: counts).
    tower = sum(p.numel() for p in model.model.visual.parameters())
    vision = shape.vision
    assert (vision.hidden_size, vision.depth, vision.mergers, vision.patch_dim, vision.params) == (
        32,
        2,
        mergers,
        3 * 2 * patch * patch,
        tower,
    )
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    tower_lora = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n and ".visual." in n)
    assert tower_lora > 0 and vision.lora_params(4) == tower_lora
    assert ModelShape.from_config(config.to_dict()) == shape  # config.json
    assert ModelShape.from_config(config.text_config).vision is None


def test_auto_chunk_sizes_count_a_trained_vision_tower():
    # The least free memory (in 1/4 GiB) where 8 sequences fit in one pass with a frozen tower: a trained one's
    # saved tensors (32 blocks x 2 x 1280 B and more per patch, 4096 patches per sequence: 3.0 GiB) do not fit.
    shape = replace(QWEN3_8B, vision=VisionShape(hidden_size=1280, depth=32, mergers=1, patch_dim=1176))
    kwargs = {"logprob_backend": "triton", "vision_patches": 4096}
    free = next(
        q / 4 * GIB for q in range(4, 800) if auto_chunk_sizes(shape, q / 4 * GIB, 8, 2048, 4096, **kwargs)[0] == 8
    )
    trained = auto_chunk_sizes(shape, free, 8, 2048, 4096, vision_trained=True, **kwargs)
    assert trained.grpo_mini_batch < 8


def test_lora_dropout_bytes_by_hand():
    # QLoRA (bf16 adapters), mask m = 1 B: q m*H, k and v (2 + m)*H each, o (2 + m)*q, gate m*H, up (2 + m)*H,
    # down m*I (module docstring); LoRA (fp32 adapters): masks m*(3H + q + 2H + I) and the down adapter's fp32 dropout
    # output 4I; MLP terms per tile; MoE models: the attention's adapters only.
    h, q, i = 8, 8, 24
    assert lora_dropout_bytes_per_token(TINY, "qlora") == h + 3 * 2 * h + 3 * q + h + 3 * h + i
    assert lora_dropout_bytes_per_token(TINY, "lora") == 3 * h + q + 2 * h + i + 4 * i
    assert lora_dropout_bytes_per_token(TINY, "qlora", tiles=2) == h + 3 * 2 * h + 3 * q + (h + 3 * h + i) / 2
    assert lora_dropout_bytes_per_token(TINY, "full") == 0
    moe = ModelShape(**{**TINY.__dict__, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8})
    assert lora_dropout_bytes_per_token(moe, "qlora") == h + 3 * 2 * h + 3 * q
    # Qwen3-8B QLoRA: 69,632 B per token, 14.3 GiB more at the recompute peak of 2 x 110,338 tokens.
    assert lora_dropout_bytes_per_token(QWEN3_8B, "qlora") == 69_632
    setups = [TrainSetup.for_path("ours", 2, 102_146, 8192, mode="qlora", lora_dropout=d) for d in (False, True)]
    plans = [plan_memory(QWEN3_8B, s, activation_scale=1.0) for s in setups]
    assert plans[1].allocated - plans[0].allocated == 69_632 * 2 * 110_338
    with pytest.raises(ValueError, match=r"lora_dropout must be False with mode='full' \(no adapters\), got True"):
        TrainSetup(2, 0, 100, mode="full", lora_dropout=True)
    with pytest.raises(ValueError, match=r"nf4_nested_scales must be False with mode='lora' \(no 4-bit weights\)"):
        TrainSetup(2, 0, 100, nf4_nested_scales=True)


@pytest.mark.parametrize("mode", ["qlora", "lora"])
def test_lora_dropout_saved_bytes_match_peft(mode):
    """What a Qwen3 layer with PEFT's adapters saves for the backward with `lora_dropout > 0` beyond what it saves
    without, per token, equals `lora_dropout_bytes_per_token` less its transient (LoRA: the down adapter's fp32 dropout
    output `4I`, alive only at the cast), with the mask of torch's CPU dropout: a tensor of the input's dtype (QLoRA's
    bf16 adapters: 2 B; LoRA's fp32 adapters, which PEFT feeds an fp32 copy of the input: 4 B), where CUDA's is a 1 B
    bool mask (the planner's default). QLoRA: bf16 adapters, as TRL casts them; LoRA: fp32 adapters under bf16
    autocast, as the trainer runs them. Exact: every saved storage counted once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    tokens, cpu_mask_bytes = 24, {"qlora": 2, "lora": 4}[mode]

    def saved_bytes(dropout: float) -> int:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
        if mode == "qlora":
            for param in model.parameters():
                param.data = param.data.to(torch.bfloat16)
        model.enable_input_require_grads()  # as TRL does for PEFT with gradient checkpointing: every adapter
        model.train()  # input then needs its dropout's backward (in a deeper model, every layer after the first)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "lora")
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 64, (1, tokens)))
        return sum(storages.values())

    shape = ModelShape.from_config(config)
    transient = FP32 * shape.intermediate_size if mode == "lora" else 0
    expected = lora_dropout_bytes_per_token(shape, mode, mask_bytes=cpu_mask_bytes) - transient
    assert saved_bytes(0.1) - saved_bytes(0.0) == tokens * expected
