"""LongContextGRPOTrainer on a tiny random Qwen3: same log-probs as TRL's path, every loss type trains."""

import pytest
import torch
from testing_utils import assert_close, cpu_trainer_settings
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOTrainer

from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
from trl_longctx.tasks import make_copy_letter_dataset

# fp32 end to end: our chunked log-softmax against TRL's own fused lm_head path.
TOLERANCES = {"logps": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-5, "rtol": 1e-3}}
# Extra settings a loss type needs in TRL 1.16 (`GRPOTrainer.__init__` rejects other combinations).
LOSS_TYPE_SETTINGS = {"luspo": {"importance_sampling_level": "sequence"}}


def varied_reward(completions, **kwargs):
    """A deterministic reward that differs between completions, so advantages are non-zero."""
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


def make_trainer(model_dir, tmp_path, peft_config=None, **overrides):
    settings = cpu_trainer_settings(tmp_path, **overrides)
    return LongContextGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=varied_reward,
        args=LongContextGRPOConfig(**settings),
        train_dataset=make_copy_letter_dataset(32),
        peft_config=peft_config,
    )


def random_batch(vocab_size, batch=3, prompt=5, completion=7):
    input_ids = torch.randint(0, vocab_size, (batch, prompt + completion))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding on one row
    return input_ids, attention_mask, completion


@pytest.mark.parametrize(
    "overrides",
    [{}, {"temperature": 0.7}, {"grpo_mini_batch": 1, "logit_chunk_multiplier": 3}, {"logit_chunk_multiplier": 1}],
)
def test_logps_and_grads_match_trl_path(tiny_model_dir, tmp_path, overrides):
    trainer = make_trainer(tiny_model_dir, tmp_path, **overrides)
    model = trainer.model
    input_ids, attention_mask, keep = random_batch(model.config.vocab_size)

    def run(implementation):
        model.zero_grad()
        logps, entropies, _ = implementation(trainer, model, input_ids, attention_mask, keep, compute_entropy=True)
        (logps.sum() + entropies.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), entropies.detach(), grads

    ours = run(LongContextGRPOTrainer._get_per_token_logps_and_entropies)
    trl = run(GRPOTrainer._get_per_token_logps_and_entropies)
    assert ours[0].shape == (3, keep) and ours[0].dtype == torch.float32
    assert_close(ours[0], trl[0], "logps", **TOLERANCES["logps"])
    assert_close(ours[1], trl[1], "entropies", **TOLERANCES["logps"])
    assert ours[2].keys() == trl[2].keys() and ours[2]
    for name in ours[2]:
        assert_close(ours[2][name], trl[2][name], f"grad of {name}", **TOLERANCES["grads"])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"])
def test_one_step_of_each_loss_type_changes_every_parameter(tiny_model_dir, tmp_path, loss_type):
    trainer = make_trainer(tiny_model_dir, tmp_path, loss_type=loss_type, **LOSS_TYPE_SETTINGS.get(loss_type, {}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.log_history[0]["reward_std"] > 0
    unchanged = [n for n, p in trainer.model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged, f"{loss_type}: parameters not updated: {unchanged}"


def test_gspo_sequence_importance_sampling_and_entropy_mask_train(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, importance_sampling_level="sequence", loss_type="grpo", top_entropy_quantile=0.5
    )
    trainer.train()
    assert "entropy" in trainer.state.log_history[0]


def test_lora_step_changes_adapters_only(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    # Two steps: lora_B starts at zero, so lora_A only gets a gradient once B has moved.
    config = LoraConfig(r=4, target_modules="all-linear")
    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=config, max_steps=2)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert not [n for n in trainable if torch.equal(params[n], trainable[n])]
    assert all(torch.equal(params[n], frozen[n]) for n in frozen)


def test_args_must_be_longctx_config(tiny_model_dir):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="args must be a LongContextGRPOConfig"):
        LongContextGRPOTrainer(
            model=tiny_model_dir, reward_funcs=varied_reward, args=GRPOConfig(output_dir="unused", use_cpu=True)
        )


# Two steps on one generation (num_iterations=2): the second step's loss compares the current log-probs with the old
# ones of the generation batch, and beta adds the KL to the reference model, so the loss and the update depend on every
# log-prob pass. SGD: AdamW's first steps move each weight by about the learning rate times the sign of its gradient,
# so a weight whose gradient is rounding noise (~1e-8) would move by a different amount in each layout.
LAYOUT_TRAINING = {
    "max_steps": 2,
    "num_iterations": 2,
    "beta": 0.04,
    "optim": "sgd",
    "gradient_checkpointing": True,
    "offload_checkpoints": True,
}


def layout_trainer(model_dir, tmp_path, layout, peft_config=None):
    """Our trainer on prompts of 3 lengths (left padding), with a model that also stops at 6 of its tokens, so
    completions end early at different lengths (EOS then right padding); full fine-tuning or `peft_config`."""
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.eos_token_id = [model.generation_config.eos_token_id, *range(10, 16)]
    prompts = ["copy a", "copy the b", "please copy c now"] * 11
    trainer = LongContextGRPOTrainer(
        model=model,
        reward_funcs=varied_reward,
        args=LongContextGRPOConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
            learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
            disable_tqdm=True, bf16=False, training_layout=layout, **LAYOUT_TRAINING,
        ),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=peft_config,
    )  # fmt: skip
    return trainer


@pytest.mark.parametrize("layout", ["packed", "shared-prompt"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_steps_with_each_layout_match_the_padded_layout(
    tiny_model_dir, tmp_path, lora, layout, monkeypatch, caplog
):
    from peft import LoraConfig

    from trl_longctx import logprob_pass

    # LoRA: the reference log-probs come from the same model with the adapter disabled; B starts non-zero so that
    # both LoRA matrices take gradients from the first step.
    peft_config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if lora else None

    plans = []
    planned = logprob_pass.plan_layout

    def recording(*args):
        plans.append(planned(*args))
        return plans[-1]

    monkeypatch.setattr(logprob_pass, "plan_layout", recording)
    runs, grads = {}, {}
    for setting in ("padded", layout):
        torch.manual_seed(0)
        with caplog.at_level("WARNING", logger="trl_longctx.longctx_grpo_trainer"):
            trainer = layout_trainer(tiny_model_dir, tmp_path / setting, setting, peft_config)
        grads[setting] = []
        trainer.add_callback(_GradientRecorder(trainer.model, grads[setting]))
        trainer.train()
        runs[setting] = trainer
    assert f"Training layout: {layout} (" in caplog.text and "a dense [tokens, tokens] mask for 'sdpa'" in caplog.text
    # Every pass of the layout run took it (the generation batch's old and reference log-probs, each step's loss), on
    # batches with left-padded prompts, completions of several lengths and, for shared-prompt, groups of rows.
    assert len(plans) == 4 and all(isinstance(p, logprob_pass.LayoutPlan) for p in plans), plans
    assert all(len(set(p.prompt_lengths)) > 1 and len(set(p.completion_lengths)) > 1 for p in plans)
    if layout == "shared-prompt":
        assert all(len(set(p.groups)) == 2 for p in plans)  # 8 rows, 2 prompts x 4 generations
    padded, ours = (runs[s].state.log_history for s in ("padded", layout))
    for step in range(2):
        for key in ("loss", "kl", "entropy", "clip_ratio/region_mean"):
            assert ours[step][key] == pytest.approx(padded[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert len(grads[layout]) == 2 and grads[layout][0].keys() == grads["padded"][0].keys()
    for step, (ours_step, padded_step) in enumerate(zip(grads[layout], grads["padded"], strict=True)):
        for name, grad in padded_step.items():
            assert_close(ours_step[name], grad, f"{layout}: step {step + 1} grad of {name}", **TOLERANCES["grads"])
    params = dict(runs["padded"].model.named_parameters())
    for name, param in runs[layout].model.named_parameters():
        assert_close(param.detach(), params[name].detach(), f"{layout}: {name}", **TOLERANCES["grads"])


class _GradientRecorder(TrainerCallback):
    """Keeps the gradient of every trainable parameter before each optimizer step."""

    def __init__(self, model, steps: list):
        self.model, self.steps = model, steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad})


def test_layout_refuses_a_router_aux_loss(tmp_path):
    from test_moe_aux_loss import make_trainer as make_moe_trainer

    with pytest.raises(ValueError, match=r"training_layout='packed' cannot train this model: .*router aux loss.*"):
        make_moe_trainer("qwen3_moe", tmp_path, training_layout="packed", router_aux_loss_coef=0.01)
