"""Bad input gets an error naming the field (or function) and what is allowed, before any model is loaded if possible."""

import pytest
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM

from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
from trl_longctx.cli import parse_train_args
from trl_longctx.guards import RewardFunctionError
from trl_longctx.tasks import make_copy_letter_dataset
from trl_longctx.tiny_models import save_tiny_model


def config(tmp_path, **overrides):
    settings = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_generations": 4,
        "max_completion_length": 4, "max_steps": 1, "report_to": "none", "use_cpu": True, "bf16": False,
        "save_strategy": "no", "disable_tqdm": True,
    }  # fmt: skip
    return LongContextGRPOConfig(**{**settings, **overrides})


def broken_reward(completions, **kwargs):
    raise KeyError("answer")


def short_reward(completions, **kwargs):
    return [1.0]


def ok_reward(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.parametrize(
    ("reward", "error", "message"),
    [
        (broken_reward, RewardFunctionError, r"'broken_reward' raised KeyError at training step 1"),
        (short_reward, ValueError, r"'short_reward' returned 1 rewards at training step 1; expected 4 rewards"),
    ],
)
def test_bad_reward_function_is_named(tiny_model_dir, tmp_path, reward, error, message):
    trainer = LongContextGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=reward,
        args=config(tmp_path),
        train_dataset=make_copy_letter_dataset(8),
    )
    with pytest.raises(error, match=message):
        trainer.train()


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (Dataset.from_dict({"prompt": []}), "train_dataset is empty"),
        (Dataset.from_dict({"question": ["copy: a"]}), r"needs a 'prompt' column; its columns are \['question'\]"),
    ],
)
def test_bad_dataset_fails_before_the_model_is_loaded(tmp_path, dataset, message):
    # A model path that does not exist: the dataset error must come first.
    with pytest.raises(ValueError, match=message):
        LongContextGRPOTrainer(
            model=str(tmp_path / "no-model"), reward_funcs=ok_reward, args=config(tmp_path), train_dataset=dataset
        )


def test_prompt_longer_than_the_context(tmp_path):
    model_dir = save_tiny_model(tmp_path / "short", max_position_embeddings=16)
    trainer = LongContextGRPOTrainer(
        model=str(model_dir),
        reward_funcs=ok_reward,
        args=config(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": ["copy: " + "a" * 14] * 4}),
    )
    with pytest.raises(
        ValueError,
        match=r"prompt of 20 tokens plus max_completion_length=4 exceeds the model's max_position_embeddings=16",
    ):
        trainer.train()


RECIPE = {"output_dir": "unused", "use_cpu": True, "report_to": "none", "use_vllm": False}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"max_step": 3}, "max_step"),  # mistyped key
        ({"grpo_mini_batch": 1.5}, "grpo_mini_batch must be a positive integer"),  # wrong type
        ({"per_device_train_batch_size": 3, "num_generations": 4}, "num_generations"),  # impossible combination
    ],
)
def test_bad_recipe_entries_are_named(tmp_path, entries, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, **entries}))
    with pytest.raises(ValueError, match=message):
        parse_train_args([str(path)])


def test_wrong_type_on_the_command_line_is_named(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    with pytest.raises(SystemExit):
        parse_train_args([str(path), "--max_steps", "ten"])
    assert "--max_steps" in capsys.readouterr().err


def test_recipes_are_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(yaml.YAMLError):
        parse_train_args([str(path)])
    assert not marker.exists()


def test_remote_code_is_off_unless_asked(tmp_path):
    # TRL 1.16 loads the policy, reference and reward models with `args.trust_remote_code` (ModelConfig has none).
    assert config(tmp_path).trust_remote_code is False
