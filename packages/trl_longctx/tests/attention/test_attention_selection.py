"""`flex_attention` resolved per model and device (`trl_longctx.attention.choose_attention`), applied
(`use_flex_attention`), logged by the trainer, and refused where it cannot run. Choosing touches no CUDA, so the CUDA
rows run on CPU."""

import logging
import re

import pytest
import torch
from test_moe_aux_loss import make_trainer, tiny_moe
from testing_utils import build_model
from transformers import GptOssForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from trl_longctx import LongContextGRPOConfig
from trl_longctx.attention import LONGCTX_FLEX, choose_attention, has_attention_sinks, use_flex_attention
from trl_longctx.attention.flex_sinks import flex_attention_forward
from trl_longctx.logprob_pass import LogProbPass
from trl_longctx.memory import planner
from trl_longctx.tiny_models import build_char_tokenizer

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def gpt_oss(implementation="eager"):
    model = tiny_moe("gpt_oss", build_char_tokenizer())
    model.config._attn_implementation = implementation
    return model


@pytest.mark.parametrize(
    ("setting", "device", "model", "runs", "reason"),
    [
        (None, CUDA, gpt_oss, LONGCTX_FLEX, r"attention sinks folded into compiled flex attention, memory linear"),
        (None, CPU, gpt_oss, "eager", r"the model's own, whose \[batch, heads, T, T\] scores .*CUDA only, not on cpu"),
        (None, CUDA, lambda: build_model("qwen3"), "eager", r"only for models with attention sinks; True turns it on"),
        (None, CUDA, lambda: gpt_oss("flex_attention"), "flex_attention", r"own 'flex_attention'; .*=True replaces"),
        (False, CUDA, gpt_oss, "eager", r"the model's own, whose .* as flex_attention=False asks"),
        (True, CUDA, lambda: build_model("gemma2"), LONGCTX_FLEX, r"flex_attention=True"),
    ],
    ids=["sinks-cuda", "sinks-cpu", "no-sinks", "other-attention", "off", "forced-sliding-window-model"],
)
def test_choice(setting, device, model, runs, reason):
    choice = choose_attention(setting, model(), device)
    assert choice.implementation == runs and choice.ours == (runs == LONGCTX_FLEX)
    assert choice.describe().startswith(f"Attention: {runs} for ")
    assert re.search(reason, choice.reason), choice.reason


def test_choice_keeps_a_model_without_flex_support(monkeypatch):
    monkeypatch.setattr(GptOssForCausalLM, "_supports_flex_attn", False)
    choice = choose_attention(None, gpt_oss(), CUDA)
    assert not choice.ours and "declares no flex attention support; flex_attention=True tries" in choice.reason


def test_ours_needs_cuda():
    with pytest.raises(ValueError, match=r"flex_attention=True needs training on CUDA, got cpu.*None or False"):
        choose_attention(True, gpt_oss(), CPU)
    for setting in (None, False, True):
        assert (
            choose_attention(setting, gpt_oss(LONGCTX_FLEX), CUDA).reason
            == "loaded with attn_implementation='longctx_flex'"
        )
        with pytest.raises(ValueError, match=r"loaded with attn_implementation='longctx_flex', which trains on CUDA"):
            choose_attention(setting, gpt_oss(LONGCTX_FLEX), CPU)


def test_use_flex_attention_registers_and_switches_through_peft():
    trainer_model = build_model("gemma2", lora=True)
    assert not has_attention_sinks(trainer_model) and has_attention_sinks(gpt_oss())
    use_flex_attention(trainer_model)
    assert trainer_model.get_base_model().config._attn_implementation == LONGCTX_FLEX
    assert ALL_ATTENTION_FUNCTIONS[LONGCTX_FLEX] is flex_attention_forward
    assert LONGCTX_FLEX in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def test_use_flex_attention_refuses_a_model_that_keeps_its_attention(monkeypatch):
    # transformers only logs when a model's attention cannot be switched; we refuse, naming the setting.
    monkeypatch.setattr(GptOssForCausalLM, "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(
        RuntimeError, match=r"GptOssForCausalLM kept attn_implementation='eager'.*flex_attention=False"
    ):
        use_flex_attention(gpt_oss())


def test_trainer_logs_which_attention_runs(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_longctx.longctx_grpo_trainer"):
        trainer = make_trainer("gpt_oss", tmp_path)
    assert not trainer.attention.ours and trainer.model.get_base_model().config._attn_implementation == "eager"
    assert "Attention: eager for GptOssForCausalLM (the model's own, whose [batch, heads, T, T]" in caplog.text
    assert "longctx_flex trains on CUDA only, not on cpu" in caplog.text


def test_config_refuses_true_off_cuda(tmp_path):
    with pytest.raises(ValueError, match=r"flex_attention must be None or False when training on cpu, got True"):
        LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True, flex_attention=True)


def test_log_prob_pass_plans_for_the_attention_that_runs(tmp_path, monkeypatch):
    # The planner models SDPA and our flex attention; any other attention is planned as SDPA.
    seen = []

    def plan(*args, **kwargs):
        seen.append(kwargs["attention"])
        return planner.ChunkSizes(1, 16, 1)

    monkeypatch.setattr(planner, "auto_chunk_sizes", plan)
    args = LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True)
    config = gpt_oss().config
    for attention in (LONGCTX_FLEX, "eager"):
        passes = LogProbPass(args, CPU, attention=attention)
        passes.free_bytes = lambda: 2**30  # plan on CPU, as on CUDA
        passes.sizes(config, config.vocab_size, 2, 100, 50)
    assert seen == [LONGCTX_FLEX, "sdpa"]


@pytest.mark.parametrize(
    ("setting", "device", "implementation", "runs", "reason"),
    [
        (None, CUDA, "sdpa", LONGCTX_FLEX, r"training_layout='shared-prompt' attends over block-sparse masks"),
        (None, CUDA, "flex_attention", "flex_attention", r"own 'flex_attention', which takes the block masks"),
        (None, CPU, "sdpa", "sdpa", r"the model's own; flex_attention=None uses longctx_flex only"),
        (True, CUDA, "sdpa", LONGCTX_FLEX, r"flex_attention=True"),
    ],
    ids=["cuda", "cuda-transformers-flex", "cpu-dense-mask", "forced"],
)
def test_choice_for_a_packed_layout(setting, device, implementation, runs, reason):
    """A packed `training_layout` on CUDA runs flex attention (its masks as BlockMasks); on CPU, the model's own
    attention takes them dense (`trl_longctx.attention.segment_mask`)."""
    model = build_model("qwen3")
    model.config._attn_implementation = implementation
    choice = choose_attention(setting, model, device, "shared-prompt")
    assert choice.implementation == runs and re.search(reason, choice.reason), choice.reason


def test_packed_layout_on_cuda_refuses_the_models_own_attention():
    with pytest.raises(ValueError, match=r"flex_attention must be None or True with training_layout='packed' on CUDA"):
        choose_attention(False, build_model("qwen3"), CUDA, "packed")
    assert choose_attention(False, build_model("qwen3"), CUDA, "padded").implementation == "eager"
