"""The packed and shared-prompt layouts of the log-prob pass (`trl_longctx.training_layout`) against the plain padded
pass: per-token log-probs, entropies and the gradient of every trainable parameter (LoRA and full fine-tuning) of
tiny random Qwen3 and Llama models, on a GRPO batch as TRL builds it: 2 prompts of different lengths (left padding)
x 4 generations of different lengths (EOS then right padding, one completion masked out entirely), rows shuffled as
TRL shuffles them before a step. Mini batches of 1, 3 (cutting groups) and all rows; without checkpointing,
checkpointed, with offloaded checkpoints and tiled MLPs; the dense masks of sdpa and eager, and flex attention's
BlockMask. Also the plan itself (groups found by comparing prompts, positions, what falls back and why).
"""

import logging

import pytest
import torch
from testing_utils import VOCAB, assert_close, build_model, flex_backward_on_cpu

from trl_longctx.logprob_pass import LogProbPass, run_log_prob_pass
from trl_longctx.memory.offload_checkpoints import CheckpointOffloader
from trl_longctx.memory.planner import ChunkSizes
from trl_longctx.model_heads import decoder_and_lm_head, plain_lm_head_weights
from trl_longctx.training_layout import LayoutPlan, layout_problem, plan_layout

# fp32 end to end; the same decoder over the same keys per query, summed in another order (a packed row's softmax
# and matmuls see other shapes than the padded ones): the style guide's fp32 rows.
TOLERANCES = {
    "logps": {"atol": 1e-5, "rtol": 1e-4},
    "grads": {"atol": 1e-5, "rtol": 1e-3},
}
LAYOUTS = ["packed", "shared-prompt"]
PROMPT_WIDTH, COMPLETION_WIDTH, EOS, PAD = 6, 7, 1, 0
PROMPT_LENGTHS = (4, 6)  # the first prompt is left-padded by 2
# Per generation: real completion tokens, EOS included when shorter than the width; 0: a completion TRL masked out
# (mask_truncated_completions).
COMPLETION_LENGTHS = ((7, 3, 5, 0), (6, 2, 7, 1))


def grpo_batch(seed: int = 0):
    """`(input_ids, attention_mask, logits_to_keep)` of 2 prompts x 4 generations, as TRL concatenates them, rows
    shuffled."""
    generator = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for prompt_length, lengths in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, strict=True):
        prompt = torch.randint(2, VOCAB, (prompt_length,), generator=generator)
        for length in lengths:
            ids = torch.full((PROMPT_WIDTH + COMPLETION_WIDTH,), PAD)
            ids[PROMPT_WIDTH - prompt_length : PROMPT_WIDTH] = prompt
            ids[PROMPT_WIDTH : PROMPT_WIDTH + length] = torch.randint(2, VOCAB, (length,), generator=generator)
            if 0 < length < COMPLETION_WIDTH:
                ids[PROMPT_WIDTH + length - 1] = EOS
            mask = torch.zeros_like(ids)
            mask[PROMPT_WIDTH - prompt_length : PROMPT_WIDTH + length] = 1
            rows.append(ids)
            masks.append(mask)
    order = torch.randperm(len(rows), generator=generator)
    return torch.stack(rows)[order], torch.stack(masks)[order], COMPLETION_WIDTH


def run_pass(model, batch, layout=None, mini_batch=8, offload=False, tiles=1):
    """Log-probs and entropies (0 where the completion mask is 0) and the gradients of every trainable parameter of
    `sum(mask * (w * logps + v * entropies))` with fixed random `w`, `v`."""
    input_ids, attention_mask, keep = batch
    decoder, lm_head = decoder_and_lm_head(model)
    plan = None if layout is None else plan_layout(layout, input_ids, attention_mask, keep)
    assert plan is None or isinstance(plan, LayoutPlan), plan
    model.zero_grad()
    logps, entropies, _ = run_log_prob_pass(
        model, decoder, plain_lm_head_weights(lm_head), input_ids, attention_mask, keep,
        ChunkSizes(mini_batch, None, tiles), offloader=CheckpointOffloader() if offload else None,
        compute_entropy=True, layout=plan,
    )  # fmt: skip
    completion_mask = attention_mask[:, -keep:]
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(logps.shape, generator=generator), torch.randn(logps.shape, generator=generator)
    (completion_mask * (weights[0] * logps + weights[1] * entropies)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), entropies.detach(), grads, completion_mask


def assert_same_pass(ours, padded, layout):
    """The layout's results equal the padded pass's where TRL's mask is 1, are 0 where it is 0, and every trainable
    parameter gets the same (non-zero) gradient."""
    mask = padded[3].bool()
    for index, what in ((0, "logps"), (1, "entropies")):
        assert torch.all(ours[index][~mask] == 0), f"{layout}: {what} not 0 on padding"
        assert_close(ours[index][mask], padded[index][mask], f"{layout}: {what}", **TOLERANCES["logps"])
    assert ours[2].keys() == padded[2].keys() and ours[2]
    for name, grad in padded[2].items():
        assert grad.abs().max() > 0, f"no gradient reaches {name}"
        assert_close(ours[2][name], grad, f"{layout}: grad of {name}", **TOLERANCES["grads"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mini_batch", [1, 3, 8], ids=["mini-batch-1", "mini-batch-3", "mini-batch-all"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_layout_matches_padded_pass(arch, lora, mini_batch, layout):
    model = build_model(arch, lora=lora)  # eager attention, gradient checkpointing on, training mode
    batch = grpo_batch()
    padded = run_pass(model, batch, mini_batch=mini_batch)
    assert_same_pass(run_pass(model, batch, layout, mini_batch=mini_batch), padded, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    ("checkpointing", "offload", "tiles"),
    [(False, False, 1), (True, False, 1), (True, True, 1), (True, True, 2)],
    ids=["no-checkpointing", "checkpointed", "checkpoints-offloaded", "offloaded-and-tiled-mlp"],
)
def test_layout_with_checkpoints_offloaded_and_tiled(checkpointing, offload, tiles, layout):
    model = build_model("qwen3", lora=True)
    if not checkpointing:
        model.gradient_checkpointing_disable()
    batch = grpo_batch()
    padded = run_pass(model, batch, mini_batch=3)
    assert_same_pass(run_pass(model, batch, layout, mini_batch=3, offload=offload, tiles=tiles), padded, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_with_sdpa_dense_mask(layout):
    model = build_model("llama", lora=True)
    model.config._attn_implementation = "sdpa"
    batch = grpo_batch()
    assert_same_pass(run_pass(model, batch, layout, mini_batch=3), run_pass(model, batch, mini_batch=3), layout)


def test_layouts_with_flex_attention_block_mask():
    """Qwen3 on our flex attention (`longctx_flex`, as the trainer runs the layouts on CUDA): the packed rows' masks are
    BlockMasks built by the compiled `create_block_mask`; the padded pass is eager. torch's CPU refusal of flex
    attention's backward is lifted for the test (`testing_utils.flex_backward_on_cpu`)."""
    from trl_longctx.attention import use_flex_attention

    model = build_model("qwen3", lora=True)
    batch = grpo_batch()
    padded = run_pass(model, batch)
    use_flex_attention(model)
    with flex_backward_on_cpu():
        for layout in LAYOUTS:
            assert_same_pass(run_pass(model, batch, layout), padded, layout)


def test_plan_groups_rows_by_comparing_prompts():
    input_ids, attention_mask, keep = grpo_batch()
    plan = plan_layout("shared-prompt", input_ids, attention_mask, keep)
    prompts = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids[:, :-keep], attention_mask[:, :-keep])]
    assert len(set(prompts)) == 2
    for a in range(8):
        for b in range(8):
            assert (plan.groups[a] == plan.groups[b]) == (prompts[a] == prompts[b])
    assert sorted(plan.order) == list(range(8)) and plan.reordered  # the shuffled rows, grouped
    grouped = [plan.groups[row] for row in plan.order]
    assert grouped == sorted(grouped, key=grouped.index)  # each group's rows adjacent
    assert plan.prompt_lengths == tuple(len(p) for p in prompts)
    # Each prompt once, every completion token: 4 + 6 + sum of the completion lengths.
    assert plan.real_tokens() == 10 + sum(map(sum, COMPLETION_LENGTHS))
    packed = plan_layout("packed", input_ids, attention_mask, keep)
    assert not packed.reordered and len(set(packed.groups)) == 8


def test_packed_rows_positions_and_predictors():
    """The packed row of a whole group: the prompt once, then each completion; positions are TRL's columns (a
    completion continues from the prompt's last column); each completion's first token is predicted by the prompt's
    last token, the others by the token before them."""
    input_ids, attention_mask, keep = grpo_batch()
    plan = plan_layout("shared-prompt", input_ids, attention_mask, keep)
    rows = plan.mini_batch(input_ids, 0, 4)  # the first group (of the prompt of 4 or 6 tokens)
    first = plan.order[0]
    prompt, lengths = plan.prompt_lengths[first], [plan.completion_lengths[r] for r in plan.order[:4]]
    assert rows.tokens == prompt + sum(lengths)
    columns = list(range(PROMPT_WIDTH - prompt, PROMPT_WIDTH))
    for length in lengths:
        columns += list(range(PROMPT_WIDTH, PROMPT_WIDTH + length))
    assert rows.position_ids[0].tolist() == columns
    assert rows.documents.tolist() == [0] * rows.tokens
    segments = [0] * prompt
    for member, length in enumerate([n for n in lengths if n], start=1):
        segments += [member] * length
    assert rows.segments.tolist() == segments
    starts = [prompt + sum(lengths[:i]) for i in range(4)]
    for local, (row, start, length) in enumerate(zip(plan.order[:4], starts, lengths, strict=True)):
        scored = rows.places // keep == local
        assert int(scored.sum()) == length
        expected = [prompt - 1] + list(range(start, start + length - 1)) if length else []
        assert rows.predictors[scored].tolist() == expected
        assert rows.targets[scored].tolist() == input_ids[row, PROMPT_WIDTH : PROMPT_WIDTH + length].tolist()


@pytest.mark.parametrize(
    ("edit", "layout", "reason"),
    [
        ("distinct-prompts", "shared-prompt", "no two of its rows share a prompt"),
        ("hole", "packed", "not left-padded prompts followed by right-padded completions"),
        ("no-completions", "packed", "no row has a completion token to score"),
        ("no-prompt", "shared-prompt", "a row has completion tokens but no prompt token"),
    ],
)
def test_batches_a_layout_cannot_take(edit, layout, reason):
    input_ids, attention_mask, keep = grpo_batch()
    if edit == "distinct-prompts":
        input_ids[:, PROMPT_WIDTH - 1] = torch.arange(8) + 2  # every prompt's last token differs
    elif edit == "hole":
        attention_mask[0, PROMPT_WIDTH : PROMPT_WIDTH + 3] = torch.tensor([1, 0, 1])  # padding inside a completion
    elif edit == "no-completions":
        attention_mask[:, -keep:] = 0
    else:
        attention_mask[:, :PROMPT_WIDTH] = 0
    assert reason in plan_layout(layout, input_ids, attention_mask, keep)


class _Args:
    grpo_mini_batch, logit_chunk_multiplier, tiled_mlp_chunks, logprob_backend = None, None, None, "torch"
    offload_checkpoints, gradient_checkpointing = False, True

    def __init__(self, layout):
        self.training_layout = layout


def test_rows_without_a_shared_prompt_run_the_padded_pass_and_say_so_once(caplog, monkeypatch):
    """`LogProbPass` with `training_layout="shared-prompt"` on a batch whose rows share no prompt: the padded pass
    runs (its log-probs, with 0 where TRL's mask is 0), and the log says why, once for two such batches."""
    model = build_model("qwen3", lora=True)
    input_ids, attention_mask, keep = grpo_batch()
    input_ids[:, PROMPT_WIDTH - 1] = torch.arange(8) + 2
    decoder, lm_head = decoder_and_lm_head(model)
    head = plain_lm_head_weights(lm_head)
    passes = LogProbPass(_Args("shared-prompt"), torch.device("cpu"))
    calls = []
    original = decoder.forward

    def counting(**kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(**kwargs)

    monkeypatch.setattr(decoder, "forward", counting)
    with caplog.at_level(logging.WARNING, logger="trl_longctx.logprob_pass"), torch.no_grad():
        for _ in range(2):
            logps, _, _ = passes(model, decoder, head, input_ids, attention_mask, keep)
    assert calls == [input_ids.shape] * 2  # the padded rows, not a packed one
    padded, _, _, mask = run_pass(model, (input_ids, attention_mask, keep))
    assert torch.all(logps[mask == 0] == 0)
    assert_close(logps[mask.bool()], padded[mask.bool()], "logps", **TOLERANCES["logps"])
    messages = [r.getMessage() for r in caplog.records if "runs the padded pass" in r.getMessage()]
    assert messages == [
        "training_layout='shared-prompt': a batch runs the padded pass, as no two of its rows share a prompt (same "
        "log-probs, padding computed)."
    ]
    assert passes.fallbacks == {"no two of its rows share a prompt"}


@pytest.mark.parametrize(
    ("arch", "why"),
    [
        ("gemma2", "has sliding-window attention layers"),
        ("qwen3-flash", "runs attn_implementation='flash_attention_2', which takes no packed mask"),
        ("llama-lm-head-lora", "lm_head carries an adapter, so TRL's own log-prob pass runs"),
        ("qwen2_5_vl", "is a vision-language model: its image tokens and 3D rotary positions are not packed"),
    ],
)
def test_models_a_layout_cannot_train(arch, why):
    from peft import LoraConfig, get_peft_model

    from trl_longctx.tiny_vl_models import build_tiny_vl_model, build_vl_tokenizer

    if arch.endswith("vl"):
        model = build_tiny_vl_model(arch, build_vl_tokenizer())
    else:
        model = build_model(arch.split("-")[0])
    if arch.endswith("flash"):
        model.config._attn_implementation = "flash_attention_2"
    if arch.endswith("lm-head-lora"):
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert why in layout_problem(model, "packed", router_aux_loss=False)
    assert layout_problem(model, "padded", router_aux_loss=False) is None
    assert layout_problem(build_model("qwen3"), "shared-prompt", router_aux_loss=False) is None
    assert "router aux loss" in layout_problem(build_model("qwen3"), "packed", router_aux_loss=True)


def test_config_refuses_a_packed_layout_without_flex_attention_on_cuda():
    """The combination is checked when the config is built (on CUDA only, so its rule is applied here to a stand-in
    config on a CUDA device); the trainer's attention choice refuses it too (tests/attention)."""
    from types import SimpleNamespace

    from trl_longctx.config_checks import COMBINATIONS

    (rule,) = [c for c in COMBINATIONS if c.fields == ("training_layout", "flex_attention")]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    refused = rule.check(SimpleNamespace(training_layout="packed", flex_attention=False, device=cuda))
    assert refused.startswith("flex_attention must be None or True with training_layout='packed' on CUDA, got False")
    for layout, flex, device in (("packed", None, cuda), ("packed", False, cpu), ("padded", False, cuda)):
        assert rule.check(SimpleNamespace(training_layout=layout, flex_attention=flex, device=device)) is None
