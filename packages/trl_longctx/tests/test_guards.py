"""Non-finite log-probs, losses and rewards: a clear error naming the step and the tensor, or a skipped step."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
from trl_longctx.guards import GuardedRewardFunction, NonFiniteError
from trl_longctx.tasks import make_copy_letter_dataset


def varied_reward(completions, **kwargs):
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


def nan_reward(completions, **kwargs):
    return [math.nan] + [0.5] * (len(completions) - 1)


class NaNLossTrainer(LongContextGRPOTrainer):
    """A trainer whose loss is always NaN (as after an overflow)."""

    def _compute_loss(self, model, inputs):
        return super()._compute_loss(model, inputs) * float("nan")


def make_trainer(model_dir, tmp_path, reward_funcs=varied_reward, cls=LongContextGRPOTrainer, **overrides):
    settings = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_generations": 4,
        "max_completion_length": 4, "max_steps": 1, "learning_rate": 1e-2, "report_to": "none", "use_cpu": True,
        "bf16": False, "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
    }  # fmt: skip
    settings.update(overrides)
    return cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=reward_funcs,
        args=LongContextGRPOConfig(**settings),
        train_dataset=make_copy_letter_dataset(16),
    )


def test_nan_reward_names_function_and_step(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[varied_reward, nan_reward])
    with pytest.raises(
        NonFiniteError, match=r"Reward function 'nan_reward' returned non-finite rewards at training step 1"
    ):
        trainer.train()


def test_nan_reward_is_unscorable_when_skipping(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, reward_funcs=[varied_reward, nan_reward], skip_nonfinite_steps=True
    )
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def numpy_reward(completions, **kwargs):
    return np.array([(sum(map(ord, c)) % 7) / 7 for c in completions], dtype=np.float32)


def tuple_reward(completions, **kwargs):
    return tuple(float(len(c) % 3) for c in completions)


def tensor_reward(completions, **kwargs):
    return torch.tensor([float(len(c) % 2) for c in completions])


def test_rewards_as_numpy_tuple_or_tensor_train_as_in_trl(tiny_model_dir, tmp_path):
    """TRL 1.16 accepts any 1-D sequence of numbers from a reward function; so does the guard."""
    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[numpy_reward, tuple_reward, tensor_reward])
    trainer.train()
    logged = trainer.state.log_history[0]
    for name in ("numpy_reward", "tuple_reward", "tensor_reward"):
        assert math.isfinite(logged[f"rewards/{name}/mean"])


def guarded(func, skip=False):
    return GuardedRewardFunction(func, func.__name__, step=lambda: 3, skip=lambda: skip)


def test_guarded_rewards_come_back_as_a_list_with_none_kept():
    prompts = ["a", "b", "c"]
    out = guarded(lambda **kw: np.array([0.5, 1.0, 0.0]))(prompts=prompts, completions=prompts)
    assert out == [0.5, 1.0, 0.0] and all(type(r) is float for r in out)
    assert guarded(lambda **kw: (1, None, 0.25))(prompts=prompts, completions=prompts) == [1, None, 0.25]
    assert guarded(lambda **kw: [np.float32(2.0)] * 3)(prompts=prompts, completions=prompts) == [2.0] * 3
    nan = guarded(lambda **kw: np.array([0.5, np.nan, 0.0]), skip=True)(prompts=prompts, completions=prompts)
    assert nan == [0.5, None, 0.0]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (np.zeros((3, 1)), r"returned an array of shape \(3, 1\) at training step 3; expected 3 rewards"),
        (np.float64(1.0), r"returned a single float64 at training step 3; expected 3 rewards"),
        ({"a": 1.0}, r"returned dict at training step 3"),
        ("abc", r"returned str at training step 3"),
        (["1.0", 0.0, 0.0], r"returned '1.0' \(str\) at index 0 at training step 3; a reward is a float, or None"),
        ([1.0, 2.0], r"returned 2 rewards at training step 3; expected 3 rewards"),
    ],
    ids=["2-d", "scalar", "dict", "str", "str-item", "short"],
)
def test_bad_reward_outputs_name_the_function_step_and_what_is_allowed(returned, message):
    def my_reward(**kwargs):
        return returned

    with pytest.raises(ValueError, match=message) as error:
        guarded(my_reward)(prompts=["a", "b", "c"], completions=["a", "b", "c"])
    assert "'my_reward'" in str(error.value)


def test_nan_logps_name_the_tensor_and_step(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    # Only in the loss's forward (with grad): generation (no grad) must still sample.
    trainer.model.model.norm.register_forward_hook(
        lambda module, args, output: output * float("nan") if torch.is_grad_enabled() else output
    )
    with pytest.raises(NonFiniteError, match=r"Non-finite per-token log-probs at training step 1: .*NaN"):
        trainer.train()


def test_nan_loss_names_the_step(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, cls=NaNLossTrainer)
    with pytest.raises(NonFiniteError, match=r"Non-finite loss at training step 1: 1 NaN"):
        trainer.train()


def test_nan_loss_steps_are_skipped_when_asked(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, cls=NaNLossTrainer, skip_nonfinite_steps=True, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "nonfinite_skipped" in h]
    assert [h["nonfinite_skipped"] for h in logged] == [1.0, 1.0]
    # Zero gradients from the first step on: Adam's first update is 0 / (0 + eps) = 0, so nothing moved.
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_skip_flag_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match="skip_nonfinite_steps must be True or False"):
        LongContextGRPOConfig(output_dir=str(tmp_path), skip_nonfinite_steps="yes")


@pytest.mark.parametrize(
    ("max_positions", "rope", "expected"),
    [
        (40960, None, 40960),
        (40960, {"rope_type": "default", "rope_theta": 1e6}, 40960),
        # Qwen3's published YaRN settings: 4 x 32,768, longer than max_position_embeddings
        (40960, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6},
         131072),
        (131072, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6},
         131072),
        (4096, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, 8192),
        # Llama 3.1: max_position_embeddings is already the scaled context
        (131072, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 5e5}, 131072),
    ],
)  # fmt: skip
def test_context_length_limit_follows_rope_scaling(max_positions, rope, expected):
    from transformers import LlamaConfig, Qwen3Config

    from trl_longctx.guards import context_length_limit

    kind = LlamaConfig if rope and rope["rope_type"] == "llama3" else Qwen3Config
    config = kind(max_position_embeddings=max_positions, **({"rope_parameters": rope} if rope else {}))
    assert context_length_limit(config) == expected


def test_prompt_length_check_allows_a_yarn_context_and_names_it_when_exceeded():
    from transformers import Qwen3Config

    from trl_longctx.guards import check_prompt_lengths

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    config = Qwen3Config(max_position_embeddings=40960, rope_parameters=yarn)
    check_prompt_lengths(["long"], [[0] * 100_000], 31_072, config)  # 131,072 exactly: allowed
    with pytest.raises(ValueError, match=r"prompt of 100000 tokens .* context of 131072 tokens \(max_position_emb"):
        check_prompt_lengths(["long"], [[0] * 100_000], 31_073, config)
