"""Every recipe under configs/grpo parses with the CLI's parser (unknown keys and bad values fail here)."""

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from trl_longctx.cli import parse_train_args

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "grpo").glob("*.yaml"))


def test_there_are_recipes():
    assert any(r.name == "quickstart.yaml" for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(recipe, monkeypatch):
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("#"), f"{recipe.name} must open with a comment giving purpose, hardware and launch"
    for key, value in (yaml.safe_load(recipe.read_text()).get("env") or {}).items():
        monkeypatch.setenv(key, str(value))  # the parser sets them; monkeypatch restores them afterwards
    argv = [str(recipe)]
    values = yaml.safe_load(recipe.read_text())
    if not torch.cuda.is_available() and not values.get("use_cpu"):
        # A GPU recipe on a machine without one: transformers refuses bf16 there before our checks run, and our checks
        # refuse flex_attention=True off CUDA; every other key is still parsed and checked.
        argv += ["--use_cpu", "true", "--bf16", "false"]
        if values.get("flex_attention"):
            argv += ["--flex_attention", "false"]
    script_args, config, model_args = parse_train_args(argv)
    assert config.output_dir and model_args.model_name_or_path


GPU_RECIPE_HEADER = ("# Hardware:", "# Launch: longctx-grpo train", "# Measured:")


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name != "quickstart.yaml"], ids=lambda p: p.name)
def test_gpu_recipe_header_states_hardware_launch_and_measurement(recipe):
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    for opening in GPU_RECIPE_HEADER:
        assert any(line.startswith(opening) for line in header), f"{recipe.name}: header lacks {opening!r}"
    assert f"configs/grpo/{recipe.name}" in "\n".join(header), f"{recipe.name}: the launch line names another file"


def test_the_gpu_recipes_of_the_design_exist():
    names = {r.name for r in RECIPES}
    assert {"qwen3_8b_lora_long_h200.yaml", "qwen3_8b_qlora_long_80gb.yaml", "qwen3_32b_lora_h200.yaml"} <= names


def test_the_moe_recipes_exist_and_say_they_were_not_run():
    """The MoE recipes (gpt-oss-20b with flex attention and LoRA on the experts; Qwen3-30B-A3B) exist, are planned
    by a check-first line, and say that no GPU has run them."""
    moe = {"gpt_oss_20b_lora_long_80gb.yaml", "qwen3_30b_a3b_lora_h200.yaml"}
    recipes = {r.name: r for r in RECIPES if r.name in moe}
    assert set(recipes) == moe
    for name, recipe in recipes.items():
        text = recipe.read_text()
        assert "# Measured: not yet run on a GPU" in text, name
        assert "check first: longctx-grpo plan" in text, name
    gpt_oss = yaml.safe_load(recipes["gpt_oss_20b_lora_long_80gb.yaml"].read_text())
    assert gpt_oss["flex_attention"] is True
    assert gpt_oss["lora_target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "check first: longctx-grpo plan" in r.read_text()],
                         ids=lambda p: p.name)  # fmt: skip
def test_the_plan_a_recipe_names_fits_the_recipe(recipe, capsys):
    """The header's `longctx-grpo plan` check runs, plans the recipe's completion length, and says it fits."""
    from trl_longctx.memory.plan_cli import LORA_DROPOUT_DEFAULT, main

    command = re.search(r"check first: longctx-grpo plan ([^)]*)\)", recipe.read_text()).group(1)
    argv = shlex.split(command) + ["--host-memory-gib", "109"]  # the host the headers assume, not this machine's
    length = yaml.safe_load(recipe.read_text())["max_completion_length"]
    assert argv[argv.index("--completion-length") + 1] == str(length), f"{recipe.name}: the check plans another length"
    dropout = yaml.safe_load(recipe.read_text()).get("lora_dropout", LORA_DROPOUT_DEFAULT)
    planned = float(argv[argv.index("--lora-dropout") + 1]) if "--lora-dropout" in argv else LORA_DROPOUT_DEFAULT
    assert (planned > 0) == (dropout > 0), f"{recipe.name}: lora_dropout {dropout}, planned with {planned}"
    main(argv)
    assert f"{length} completion tokens fits" in capsys.readouterr().out


def test_the_vision_recipe_trains_count_squares_on_a_vision_language_model():
    recipe = next(r for r in RECIPES if r.name == "qwen3_vl_8b_qlora_24gb.yaml")
    values = yaml.safe_load(recipe.read_text())
    assert values["task"] == "count_squares" and "VL" in values["model_name_or_path"]
    assert "# Measured: not yet run on a GPU" in recipe.read_text()


def test_the_readme_lists_every_gpu_recipe():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9_]+\.yaml)` \|", readme, flags=re.MULTILINE))
    assert listed == {r.name for r in RECIPES if r.name != "quickstart.yaml"}
