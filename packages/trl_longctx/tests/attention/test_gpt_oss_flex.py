"""A whole tiny gpt-oss (alternating sliding-window and full layers, attention sinks, MoE) with LoRA on our trainer: with
`flex_attention` chosen by the trainer as it is on CUDA, the log-probs, entropies, router aux loss and LoRA gradients of
our log-prob pass equal those of the same model with eager attention, on a left- and right-padded batch of odd length.

The trainer runs on CPU here, where `flex_attention=None` keeps eager: the test has the trainer resolve its setting as
on CUDA (`choose_attention` given a CUDA device; nothing touches CUDA) and lifts torch's CPU refusal of flex
attention's backward (`testing_utils.flex_backward_on_cpu`). The block masks are transformers' own, built by its
masking utilities for `"longctx_flex"` (compiled, as on CUDA).
"""

import logging

import pytest
import torch
from test_moe_aux_loss import make_trainer, run
from testing_utils import assert_close, flex_backward_on_cpu

from trl_longctx import LongContextGRPOTrainer
from trl_longctx import longctx_grpo_trainer as trainer_module
from trl_longctx.attention import LONGCTX_FLEX, choose_attention, flex_sinks

# fp32 end to end; the same decoder with another attention kernel: the style guide's fp32 rows. The aux loss is the
# mean of softmaxed router logits, a few ops downstream of attention: tighter.
TOLERANCES = {
    "logps": {"atol": 1e-5, "rtol": 1e-4},
    "aux": {"atol": 1e-6, "rtol": 1e-5},
    "grads": {"atol": 1e-5, "rtol": 1e-3},
}
# Per layer and head; large enough that the sinks change the attention (the initialization draws them near 0).
SINKS = (-2.0, 4.0)


def padded_batch(vocab_size: int):
    """3 sequences of 30 prompt + 17 completion tokens: left padding of 0, 3 and 11 tokens; the last completion ends
    5 tokens early (TRL's attention mask is the prompt mask followed by the completion mask)."""
    input_ids = torch.randint(0, vocab_size, (3, 47))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    attention_mask[2, :11] = 0
    attention_mask[2, -5:] = 0
    return input_ids, attention_mask, 17


def trainer_choosing_as_on_cuda(tmp_path, monkeypatch, **overrides):
    monkeypatch.setattr(
        trainer_module,
        "choose_attention",
        lambda setting, model, device, layout: choose_attention(setting, model, torch.device("cuda"), layout),
    )
    trainer = make_trainer("gpt_oss", tmp_path, **overrides)
    with torch.no_grad():
        for module in trainer.model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.copy_(torch.tensor(SINKS))
    return trainer


@pytest.mark.parametrize(
    "overrides",
    [{"gradient_checkpointing": False}, {}, {"grpo_mini_batch": 1}, {"offload_checkpoints": True}],
    ids=["no-checkpointing", "checkpointed", "decoder-mini-batch-1", "checkpoints-offloaded"],
)
def test_trainer_with_flex_attention_matches_eager(overrides, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_longctx.longctx_grpo_trainer"):
        trainer = trainer_choosing_as_on_cuda(tmp_path, monkeypatch, **overrides)
    decoder_model = trainer.model.get_base_model()
    assert decoder_model.config._attn_implementation == LONGCTX_FLEX
    assert f"Attention: {LONGCTX_FLEX} for GptOssForCausalLM (attention sinks folded" in caplog.text
    assert trainer.logprob_pass._attention == LONGCTX_FLEX  # what the planner is told
    calls = []
    monkeypatch.setattr(flex_sinks, "sink_flex_attention", _counting(flex_sinks.sink_flex_attention, calls))

    trainer.model.train()  # as in a training step: gradient checkpointing recomputes only in training mode
    if trainer.args.gradient_checkpointing:  # as the Trainer's `train()` turns it on
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, attention_mask, keep = padded_batch(trainer.model.config.vocab_size)
    hook = LongContextGRPOTrainer._get_per_token_logps_and_entropies
    with flex_backward_on_cpu():
        ours = run(hook, trainer, input_ids, attention_mask, keep)
    # Each decoder pass runs each layer once, and once more in each of `run`'s two backward passes when checkpointed.
    passes = 3 if overrides.get("grpo_mini_batch") == 1 else 1
    runs = 3 if trainer.args.gradient_checkpointing else 1
    assert len(calls) == passes * len(decoder_model.model.layers) * runs
    if trainer.args.offload_checkpoints:
        assert trainer.logprob_pass.offloader.offloaded_count == len(decoder_model.model.layers) - 1
    decoder_model.set_attn_implementation("eager")
    eager = run(hook, trainer, input_ids, attention_mask, keep)

    for name, index in (("logps", 0), ("entropies", 1)):
        assert_close(ours[index], eager[index], name, **TOLERANCES["logps"])
    assert_close(ours[2], eager[2], "aux loss", **TOLERANCES["aux"])
    for which, ours_grads, eager_grads in (("total", ours[3], eager[3]), ("aux", ours[4], eager[4])):
        assert ours_grads.keys() == eager_grads.keys() and any(g.abs().max() > 0 for g in ours_grads.values())
        for name in ours_grads:
            assert_close(ours_grads[name], eager_grads[name], f"grad of {which} w.r.t. {name}", **TOLERANCES["grads"])


def _counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return function(*args, **kwargs)

    return counted
