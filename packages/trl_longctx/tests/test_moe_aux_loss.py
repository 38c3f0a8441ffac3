"""The router aux loss of MoE models on our fused log-prob path: the same log-probs, entropies, aux loss and LoRA
gradients as TRL's path, on tiny random Qwen3-MoE and gpt-oss models; TRL's mean over its mini batches kept whatever
mini batch the decoder runs in; an architecture we cannot serve goes to TRL's path, logged."""

import logging

import pytest
import torch
import transformers
from peft import LoraConfig
from test_longctx_grpo_trainer import random_batch, varied_reward
from testing_utils import assert_close, moe_config, recording
from trl import GRPOTrainer

from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
from trl_longctx.tasks import make_copy_letter_dataset
from trl_longctx.tiny_models import build_char_tokenizer

# fp32 end to end. Log-probs and entropies: our chunked log-softmax against TRL's fused lm_head (as in the dense
# trainer test). Aux loss: the model's own function on router logits of the same decoder, batched differently at
# most (a group gathered from several decoder passes), so only matmul rounding differs.
TOLERANCES = {
    "logps": {"atol": 1e-5, "rtol": 1e-4},
    "aux": {"atol": 1e-6, "rtol": 1e-5},
    "grads": {"atol": 1e-5, "rtol": 1e-3},
}
# Weight of the aux loss in the compared gradients: larger than the models' 0.001 so that its gradient shows.
AUX_COEF = 10.0
LORA = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)


def tiny_moe(arch: str, tokenizer, **config) -> transformers.PreTrainedModel:
    """A tiny random MoE causal LM of `arch` (`testing_utils.moe_config`, 2 layers, `config` on top) in fp32 for
    `tokenizer`."""
    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    return transformers.AutoModelForCausalLM.from_config(moe_config(arch, vocab=len(tokenizer), **special, **config))


def make_trainer(
    arch: str, tmp_path, peft_config: LoraConfig = LORA, model_config: dict | None = None, **overrides
) -> LongContextGRPOTrainer:
    """Our trainer on a tiny MoE (`model_config` on top of `tiny_moe`'s) with LoRA (`peft_config`), on CPU in fp32."""
    tokenizer = build_char_tokenizer()
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "bf16": False,
    }
    settings.update(overrides)
    return LongContextGRPOTrainer(
        model=tiny_moe(arch, tokenizer, **(model_config or {})),
        reward_funcs=varied_reward,
        args=LongContextGRPOConfig(**settings),
        train_dataset=make_copy_letter_dataset(32),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def as_in_training(trainer) -> None:
    """The model as `Trainer.train()` leaves it for a step: gradient checkpointing on (offloading needs it), train
    mode."""
    kwargs = trainer.args.gradient_checkpointing_kwargs
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    trainer.model.train()


def run(implementation, trainer, input_ids, attention_mask, keep, batch_size=None):
    """Log-probs, entropies, aux loss, and the LoRA gradients of logps + entropies + AUX_COEF * aux and of aux."""
    model = trainer.model
    logps, entropies, aux = implementation(
        trainer, model, input_ids, attention_mask, keep, batch_size, compute_entropy=True, compute_aux_loss=True
    )
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = logps.sum() + entropies.sum() + AUX_COEF * aux
    grads = dict(zip(lora, torch.autograd.grad(total, list(lora.values()), retain_graph=True), strict=True))
    # The last MoE layer's expert adapters (LoRA on experts) act after every router: no gradient of the aux loss.
    aux_grads = torch.autograd.grad(aux, list(lora.values()), allow_unused=True)
    aux_grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(lora.items(), aux_grads, strict=True)}
    return logps.detach(), entropies.detach(), aux.detach(), grads, aux_grads


def assert_same(ours, trl, tolerances=TOLERANCES):
    assert_close(ours[0], trl[0], "logps", **tolerances["logps"])
    assert_close(ours[1], trl[1], "entropies", **tolerances["logps"])
    assert ours[2].shape == () and ours[2].dtype == torch.float32
    assert_close(ours[2], trl[2], "aux loss", **tolerances["aux"])
    for which, ours_grads, trl_grads in (("total", ours[3], trl[3]), ("aux", ours[4], trl[4])):
        assert ours_grads.keys() == trl_grads.keys() and ours_grads
        assert any(g.abs().max() > 0 for g in ours_grads.values()), f"no gradient of {which}"
        for name in ours_grads:
            assert_close(ours_grads[name], trl_grads[name], f"grad of {which} w.r.t. {name}", **tolerances["grads"])


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"grpo_mini_batch": 1}, {"tiled_mlp_chunks": 4}, {"tiled_mlp_chunks": 4, "offload_checkpoints": True}],
    ids=["one-pass", "decoder-mini-batch-1", "tiled-experts", "tiled-experts-offloaded"],
)
def test_aux_loss_logps_and_grads_match_trl_path(arch, overrides, tmp_path, monkeypatch):
    """Our path (its decoder in mini batches, its experts tiled, its checkpoints offloaded) against TRL's untiled one:
    tiling the experts leaves the recorded router logits, hence the aux loss, as they are."""
    trainer = make_trainer(arch, tmp_path, **overrides)
    assert trainer.aux_loss_enabled  # TRL turns it on for MoE configs
    as_in_training(trainer)
    passes = []
    monkeypatch.setattr(trainer.logprob_pass, "sizes", recording(trainer.logprob_pass.sizes, passes))
    input_ids, attention_mask, keep = random_batch(trainer.model.config.vocab_size)
    ours = run(LongContextGRPOTrainer._get_per_token_logps_and_entropies, trainer, input_ids, attention_mask, keep)
    offloaded = trainer.logprob_pass.offloader.offloaded_count
    trl = run(GRPOTrainer._get_per_token_logps_and_entropies, trainer, input_ids, attention_mask, keep)
    assert passes and passes[0].grpo_mini_batch == overrides.get("grpo_mini_batch", 3)  # our path ran
    assert passes[0].tiled_mlp_chunks == overrides.get("tiled_mlp_chunks", 1)
    assert offloaded == (1 if overrides.get("offload_checkpoints") else 0)  # layer 0's input of the one pass
    assert_same(ours, trl)


@pytest.mark.parametrize("grpo_mini_batch", [None, 1, 3])
def test_aux_loss_is_the_mean_over_trl_mini_batches(grpo_mini_batch, tmp_path):
    # TRL's batch_size=2 over 5 sequences: groups of 2, 2, 1, whatever mini batches our decoder runs in (1, or 2:
    # never more than batch_size).
    trainer = make_trainer("qwen3_moe", tmp_path, grpo_mini_batch=grpo_mini_batch)
    input_ids, attention_mask, keep = random_batch(trainer.model.config.vocab_size, batch=5)
    ours = run(LongContextGRPOTrainer._get_per_token_logps_and_entropies, trainer, input_ids, attention_mask, keep, 2)
    trl = run(GRPOTrainer._get_per_token_logps_and_entropies, trainer, input_ids, attention_mask, keep, 2)
    assert_same(ours, trl)
    with torch.no_grad():
        per_group = [
            trainer.model(
                input_ids=input_ids[s : s + 2], attention_mask=attention_mask[s : s + 2], output_router_logits=True
            ).aux_loss
            for s in range(0, 5, 2)
        ]
        whole = trainer.model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    assert_close(ours[2], torch.stack(per_group).mean(), "aux loss vs mean over groups", **TOLERANCES["aux"])
    assert (ours[2] - whole).abs() > 1e-4  # the grouping matters: not the loss of the whole batch


def test_unsupported_architecture_goes_to_trl_path_logged(tmp_path, monkeypatch, caplog):
    trainer = make_trainer("qwen3_moe", tmp_path)
    decoder = type(trainer.model.get_base_model().get_decoder())
    recorded = {k: v for k, v in decoder._can_record_outputs.items() if k != "router_logits"}
    monkeypatch.setattr(decoder, "_can_record_outputs", recorded)  # a decoder that records no router logits
    monkeypatch.setattr(trainer.logprob_pass, "sizes", _refuse)
    handed_back = []
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", lambda *a, **k: handed_back.append(k))
    input_ids, attention_mask, keep = random_batch(trainer.model.config.vocab_size)
    with caplog.at_level(logging.WARNING, logger="trl_longctx.longctx_grpo_trainer"):
        LongContextGRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, keep, compute_aux_loss=True
        )
    assert len(handed_back) == 1
    assert "Qwen3MoeForCausalLM" in caplog.text and "does not record router logits" in caplog.text
    assert "build the trainer with router_aux_loss_coef=0.0 in its config, or in the model config" in caplog.text


@pytest.mark.parametrize("where", ["trainer config", "model config"])
def test_zero_aux_loss_coef_keeps_the_fused_path(where, tmp_path, monkeypatch):
    """What the hand-back warning advises, checked on TRL 1.16: with router_aux_loss_coef=0.0 in the trainer config,
    or in the model config while the trainer's is None, TRL asks for no aux loss and every pass of a training step is
    ours, even for a decoder whose aux loss we could not compute."""
    settings = {"router_aux_loss_coef": 0.0} if where == "trainer config" else {}
    model_config = {"router_aux_loss_coef": 0.0} if where == "model config" else {}
    trainer = make_trainer("qwen3_moe", tmp_path, model_config=model_config, **settings)
    assert not trainer.aux_loss_enabled
    decoder = type(trainer.model.get_base_model().get_decoder())
    recorded = {k: v for k, v in decoder._can_record_outputs.items() if k != "router_logits"}
    monkeypatch.setattr(decoder, "_can_record_outputs", recorded)
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", _refuse_trl)
    passes = []
    monkeypatch.setattr(trainer.logprob_pass, "sizes", recording(trainer.logprob_pass.sizes, passes))
    trainer.train()
    assert passes and "aux_loss" not in trainer.state.log_history[0]


def _refuse(*args, **kwargs):
    raise AssertionError("the fused log-prob pass ran for a model it cannot serve")


def _refuse_trl(*args, **kwargs):
    raise AssertionError("TRL's log-prob path ran")


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_full_fine_tuning_steps_change_every_parameter(arch, tmp_path):
    """Two GRPO steps of a tiny MoE, fully trained on our path with its experts tiled and its checkpoints offloaded:
    every parameter moves (router and experts included) and TRL logs the aux loss."""
    trainer = make_trainer(
        arch, tmp_path, peft_config=None, max_steps=2, learning_rate=1e-2, logging_steps=1, tiled_mlp_chunks=2,
        offload_checkpoints=True,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert not [n for n in before if torch.equal(params[n], before[n])]
    assert all("aux_loss" in h for h in trainer.state.log_history if "reward" in h)
    assert trainer.logprob_pass.used and all(s.tiled_mlp_chunks == 2 for s in trainer.logprob_pass.used)
