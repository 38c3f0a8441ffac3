"""A run whose weights went NaN, or whose loss stays non-finite, stops with an error instead of skipping every step."""

import math

import pytest
import torch
from test_longctx_grpo_trainer import make_trainer

from trl_longctx.fault_callbacks import MAX_CONSECUTIVE_NONFINITE, NonFiniteStopCallback
from trl_longctx.guards import NonFiniteError

# The parameter whose gradient turns NaN; without clipping (max_grad_norm=0) only it goes NaN in the update.
POISONED = "model.layers.1.mlp.down_proj.weight"


def poison_gradient(trainer, name, step):
    """Make the backward of `step` give `name` a NaN gradient while the loss stays finite (as an fp16 overflow would)."""
    param = dict(trainer.model.named_parameters())[name]
    param.register_hook(lambda grad: grad * math.nan if trainer.state.global_step + 1 == step else grad)


def nan_hidden_states(trainer, steps):
    """Make the training forward of each of `steps` return NaN hidden states (rollouts, run without grad, are fine)."""

    def hook(module, args, output):
        if torch.is_grad_enabled() and trainer.state.global_step + 1 in steps:
            return output * math.nan
        return output

    trainer.model.model.layers[-1].register_forward_hook(hook)


def skipped_by_step(trainer):
    return {h["step"]: h["nonfinite_skipped"] for h in trainer.state.log_history if "nonfinite_skipped" in h}


SETTINGS = {"skip_nonfinite_steps": True, "max_grad_norm": 0.0, "learning_rate": 5e-3}


def test_nan_weights_after_an_update_stop_the_run_naming_parameter_and_step(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, **SETTINGS, max_steps=4, save_strategy="steps", save_steps=1)
    poison_gradient(trainer, POISONED, step=2)
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert f"optimizer update of training step 2: parameter {POISONED!r}" in message
    assert "NaN" in message and "more of the" not in message  # only that tensor, named
    assert trainer.state.global_step == 2
    # Stopped before the save of step 2: the last checkpoint holds finite weights.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]


def test_clipping_spreads_a_nan_gradient_and_the_error_counts_the_tensors(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, **{**SETTINGS, "max_grad_norm": 1.0}, max_steps=3)
    poison_gradient(trainer, POISONED, step=1)
    with pytest.raises(NonFiniteError, match="training step 1: parameter 'model.embed_tokens.weight'") as error:
        trainer.train()
    trainable = sum(p.requires_grad for p in trainer.model.parameters())
    assert f"and {trainable - 1} more of the {trainable} trainable tensors" in str(error.value)


def test_consecutive_skipped_steps_stop_at_the_cap(tiny_model_dir, tmp_path):
    assert MAX_CONSECUTIVE_NONFINITE == 3
    trainer = make_trainer(tiny_model_dir, tmp_path, **SETTINGS, max_steps=8)
    nan_hidden_states(trainer, steps={2, 3, 5, 6, 7})
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert "Training steps 5-7 (3 in a row) were skipped" in message
    assert "max_consecutive_nonfinite=3" in message
    assert trainer.state.global_step == 7
    # Two skipped steps, then a finite one resets the count; the weights stayed finite throughout.
    assert skipped_by_step(trainer) == {1: 0.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0, 6: 1.0}
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_cap_is_the_configs_max_consecutive_nonfinite(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, **SETTINGS, max_steps=3, max_consecutive_nonfinite=1)
    nan_hidden_states(trainer, steps={2})
    with pytest.raises(NonFiniteError, match=r"Training steps 2-2 \(1 in a row\).*max_consecutive_nonfinite=1"):
        trainer.train()


def test_a_bad_cap_is_refused_with_the_field_and_value(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    for value in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="max_consecutive_nonfinite must be an integer >= 1") as error:
            NonFiniteStopCallback(trainer, value)
        assert str(error.value).endswith(f"got {value!r}.")
