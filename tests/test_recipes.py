"""Every recipe under configs/grpo parses with the CLI's parser (unknown keys and bad values fail here)."""

from pathlib import Path

import pytest
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
    script_args, config, model_args = parse_train_args([str(recipe)])
    assert config.output_dir and model_args.model_name_or_path
