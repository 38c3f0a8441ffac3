"""Every bad value is refused when the configuration is built: the error names the field, the value and what is
allowed; no model or engine is built; nothing is left in `output_dir`.

Each case runs `longctx-grpo train` (`trl_longctx.cli.main`) on the quickstart recipe with one entry replaced. The
recipe's model is an empty folder: had anything tried to load it, transformers would raise its own error (or the CLI
its model-path error) instead of the field's, so the field's message proves nothing was loaded. The rules the cases
come from are the ones the config applies (`trl_longctx.config_checks`), so a new rule is tested by being added.
"""

import os
import re
from pathlib import Path

import pytest
import yaml

from trl_longctx import LongContextGRPOConfig
from trl_longctx.cli import BUILTIN_TINY_MODEL, main
from trl_longctx.config_checks import (
    CONFIG_RULES,
    MODEL_RULES,
    PATH_RULES,
    SCRIPT_RULES,
    TRL_CHECKED,
    rules_markdown,
)

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "configs" / "grpo" / "quickstart.yaml"
README = Path(__file__).resolve().parents[1] / "README.md"
RULES = (*CONFIG_RULES, *SCRIPT_RULES, *MODEL_RULES)


def by_category(category):
    return [pytest.param(rule, id=rule.name) for rule in RULES if rule.category == category]


def restore_env_after(monkeypatch, recipe: dict) -> None:
    """TrlParser writes the recipe's `env:` block into `os.environ`: have monkeypatch restore those keys."""
    for key in recipe["env"]:
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def run(tmp_path, monkeypatch):
    """`run(entries)`: train on the quickstart recipe with `entries` replaced; return the ValueError's message."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    restore_env_after(monkeypatch, recipe)
    empty_model = tmp_path / "empty-model"
    empty_model.mkdir()
    output_dir = tmp_path / "run"

    def train(entries: dict, flags: tuple = ()) -> str:
        path = tmp_path / "recipe.yaml"
        settings = {**recipe, "output_dir": str(output_dir), "model_name_or_path": str(empty_model), **entries}
        path.write_text(yaml.safe_dump(settings))
        with pytest.raises(ValueError) as error:
            main(["train", str(path), *flags])
        assert not output_dir.exists() or not any(output_dir.iterdir()), sorted(output_dir.rglob("*"))
        assert not any(empty_model.iterdir())
        return str(error.value)

    return train


def assert_names(message: str, rule, value) -> None:
    expected = f"{rule.name} must be {rule.allowed()}, got {value!r}"
    assert message.startswith(expected), f"{message!r} does not start with {expected!r}"


@pytest.mark.parametrize("rule", by_category("lengths"))
def test_lengths(run, rule):
    for value in (0, -8):
        assert_names(run({rule.name: value}), rule, value)


@pytest.mark.parametrize("rule", by_category("counts"))
def test_counts(run, rule):
    assert_names(run({rule.name: rule.example}), rule, rule.example)


@pytest.mark.parametrize("rule", by_category("ratios"))
def test_ratios(run, rule):
    assert_names(run({rule.name: rule.example}), rule, rule.example)
    if rule.high is not None:
        above = rule.high + 0.5
        assert_names(run({rule.name: above}), rule, above)


@pytest.mark.parametrize("rule", by_category("lengths") + by_category("counts") + by_category("ratios"))
def test_types_of_numbers(run, rule):
    # A YAML list or a bool reaches the config unconverted (TrlParser sets them as argparse defaults).
    for value, kind in (([8], "a list"), (True, "a bool")):
        message = run({rule.name: value})
        assert_names(message, rule, value)
        assert message.endswith(f"({kind}).")


@pytest.mark.parametrize("rule", by_category("flags"))
def test_types_of_flags(run, rule):
    for value in (2, ["true"]):
        message = run({rule.name: value})
        assert_names(message, rule, value)
        assert re.search(r"\((an int|a list)\)\.$", message)


@pytest.mark.parametrize("rule", by_category("choices"))
def test_choices(run, rule):
    message = run({rule.name: rule.example})
    assert_names(message, rule, rule.example)
    assert str(list(rule.choices)) in message  # every allowed value listed


def test_paths(run, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    message = run({"output_dir": str(a_file / "run")})
    assert message.startswith(f"output_dir must be {PATH_RULES['output_dir']}, got {str(a_file / 'run')!r}")
    assert f"{str(a_file)!r} is a file" in message

    missing = str(tmp_path / "no-such" / "checkpoint-5")
    message = run({"resume_from_checkpoint": missing})
    assert message == (
        f"resume_from_checkpoint must be {PATH_RULES['resume_from_checkpoint']}, got {missing!r}: that folder does "
        "not exist."
    )
    message = run({"resume_from_checkpoint": True})
    assert message.startswith(f"resume_from_checkpoint must be {PATH_RULES['resume_from_checkpoint']}, got True")
    assert "holds no checkpoint-N folder" in message

    # The model path itself: a missing local folder, or one without config.json (the recipe's empty folder).
    for model, why in ((str(tmp_path / "no-such-model"), "does not exist"), (None, "holds no config.json")):
        message = run({} if model is None else {"model_name_or_path": model})
        assert message.startswith("model_name_or_path must be a model folder holding config.json"), message
        assert message.endswith(f"that folder {why}.")
        assert BUILTIN_TINY_MODEL in message


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"sync_ref_model": True, "beta": 0.0}, r"sync_ref_model=True needs beta > 0"),
        (
            {"loss_type": "vespo", "use_vllm_when_available": False, "use_vllm": True},
            r"vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask' with loss_type='vespo'.*got "
            r"'sequence_mask'",
        ),
        ({"logprob_backend": "triton"}, r"logprob_backend must be 'auto' or 'torch' on cpu, got 'triton'"),
        ({"offload_checkpoints": True, "gradient_checkpointing": False}, r"offload_checkpoints=True needs"),
        ({"flex_attention": True}, r"flex_attention must be None or False when training on cpu, got True: torch's"),
        (
            {"sequence_parallel_size": 2},
            r"sequence_parallel_size must divide the number of processes \(1\), got 2: .*Allowed with 1 process\(es\): "
            r"\[1\]",
        ),
        (
            {"vllm_fp8_weights": "per-channel", "vllm_importance_sampling_correction": False},
            r"vllm_fp8_weights='per-channel' needs vllm_importance_sampling_correction=True",
        ),
    ],
)
def test_combinations(run, entries, message):
    assert re.match(message, run(entries))


# What TRL / transformers refuse themselves, before anything loads, with the field in the message (`TRL_CHECKED`).
TRL_CASES = {
    "generation_batch_size": ({"generation_batch_size": 20}, r"generation_batch_size \(20\) must be divisible"),
    "steps_per_generation": (
        {"generation_batch_size": 32, "steps_per_generation": 2},
        r"'generation_batch_size' and 'steps_per_generation' can not be both configured",
    ),
    "lr_scheduler_type": ({"lr_scheduler_type": "cosinee"}, r"cosinee is not a valid SchedulerType.*'cosine'"),
    "save_strategy": ({"save_strategy": "often"}, r"often is not a valid SaveStrategy.*'steps'"),
    "bf16": ({"bf16": True, "fp16": True}, r"At most one of fp16 and bf16 can be True"),
    "vllm_importance_sampling_clip_min": (
        {"vllm_importance_sampling_clip_min": 3.0},
        r"vllm_importance_sampling_clip_min \(3.0\) must be less than vllm_importance_sampling_clip_max \(3.0\)",
    ),
    "auto_find_batch_size": ({"auto_find_batch_size": True}, r"auto_find_batch_size is not supported by GRPO"),
}


@pytest.mark.parametrize("field", sorted(TRL_CHECKED))
def test_left_to_trl_is_still_refused_before_any_load(run, field):
    entries, message = TRL_CASES[field]
    assert re.search(message, run(entries))


def test_a_bad_value_with_the_builtin_model_builds_nothing(tmp_path, monkeypatch):
    # The quickstart as shipped (built-in tiny model), one flag bad: the CLI wrote output_dir/model/ before.
    restore_env_after(monkeypatch, yaml.safe_load(QUICKSTART.read_text()))
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"max_completion_length must be a positive integer, got 0\."):
        main(["train", str(QUICKSTART), "--output_dir", str(output_dir), "--max_completion_length", "0"])
    with pytest.raises(ValueError, match=r"vllm_gpu_memory_utilization must be a number in \(0, 1\], got 1.5\."):
        main(["train", str(QUICKSTART), "--output_dir", str(output_dir), "--vllm_gpu_memory_utilization", "1.5"])
    assert not output_dir.exists()


def test_a_run_that_fails_to_start_leaves_no_files(tmp_path, monkeypatch):
    # Valid values, a LoRA target the model does not have: the trainer fails after the tiny model is built.
    restore_env_after(monkeypatch, yaml.safe_load(QUICKSTART.read_text()))
    output_dir = tmp_path / "run"
    flags = ["--output_dir", str(output_dir), "--use_vllm_when_available", "false", "--max_steps", "1"]
    with pytest.raises(ValueError, match="no_such_proj"):
        main(["train", str(QUICKSTART), *flags, "--use_peft", "true", "--lora_target_modules", "no_such_proj"])
    assert not output_dir.exists() or not any(output_dir.iterdir()), sorted(output_dir.rglob("*"))


def test_every_rule_names_a_field_and_every_field_of_ours_has_a_rule():
    from dataclasses import fields

    from trl import GRPOConfig, ModelConfig

    from trl_longctx.cli import LongContextScriptArguments

    for rules, dataclass in ((CONFIG_RULES, LongContextGRPOConfig), (SCRIPT_RULES, LongContextScriptArguments)):
        names = {f.name for f in fields(dataclass)}
        assert [r.name for r in rules if r.name not in names] == []
    assert [r.name for r in MODEL_RULES if r.name not in {f.name for f in fields(ModelConfig)}] == []
    ours = {f.name for f in fields(LongContextGRPOConfig)} - {f.name for f in fields(GRPOConfig)}
    assert sorted(ours - {r.name for r in CONFIG_RULES}) == []
    for rule in RULES:  # every example is refused, and the default is allowed
        assert rule.problem(rule.example) is not None, rule.name
    defaults = LongContextGRPOConfig(output_dir="unused", use_cpu=True, report_to="none")
    assert [r.name for r in CONFIG_RULES if r.problem(getattr(defaults, r.name)) is not None] == []


def test_rules_accept_what_they_describe():
    rule = {r.name: r for r in RULES}
    assert rule["max_steps"].problem(-1) is None and rule["max_steps"].problem(0) is not None
    assert rule["vllm_gpu_memory_utilization"].problem(1) is None
    assert rule["vllm_gpu_memory_utilization"].problem(float("nan")) is not None
    assert rule["scale_rewards"].problem(True) is None and rule["scale_rewards"].problem(1) is not None
    assert rule["grpo_mini_batch"].problem(None) is None and rule["num_generations"].problem(None) is not None
    assert rule["learning_rate"].problem(1) is None and rule["learning_rate"].problem(True) is not None


# The README's "Bad values" examples: category, recipe entry; the message is what the checks say.
README_EXAMPLES = [
    ("lengths", {"max_completion_length": 0}),
    ("counts", {"per_device_train_batch_size": 0}),
    ("counts", {"num_generations": 1}),
    ("ratios", {"vllm_gpu_memory_utilization": 1.5}),
    ("ratios", {"temperature": 0.0}),
    ("types", {"max_completion_length": [8]}),
    ("types", {"max_steps": True}),
    ("types", {"use_vllm": 2}),
    ("choices", {"vllm_mode": "remote"}),
    ("paths", {"resume_from_checkpoint": "/no/such/checkpoint-5"}),
    ("paths", {"model_name_or_path": "/no/such/model"}),
    ("combinations", {"sync_ref_model": True, "beta": 0.0}),
]


def readme_row(category: str, entries: dict, message: str) -> str:
    entry = yaml.safe_dump(entries, default_flow_style=True, sort_keys=False).strip()
    return f"| {category} | `{entry}` | {message} |"


def test_readme_shows_the_rules_and_the_real_messages(run):
    text = README.read_text()
    assert rules_markdown() in text
    for category, entries in README_EXAMPLES:
        row = readme_row(category, entries, run(entries))
        assert row in text, f"README's Bad values table lacks:\n{row}"
