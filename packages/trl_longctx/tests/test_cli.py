"""`longctx-grpo train`: YAML + CLI overrides as TRL's TrlParser reads them, clear errors, run files."""

import json

import pytest
import yaml

from trl_longctx.cli import BUILTIN_TINY_MODEL, import_reward_function, main, parse_train_args

RECIPE = {
    "env": {"TOKENIZERS_PARALLELISM": "false"},
    "task": "copy_letter",
    "num_prompts": 64,
    "model_name_or_path": BUILTIN_TINY_MODEL,
    "max_steps": 3,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 4,
    "logging_steps": 1,
    "report_to": "none",
    "use_cpu": True,
    "bf16": False,
    "save_strategy": "no",
    "use_vllm": False,
}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / "run")}))
    return path


def test_recipe_then_cli_override(recipe):
    script_args, config, model_args = parse_train_args([str(recipe), "--max_steps", "7", "--grpo_mini_batch", "2"])
    assert script_args.num_prompts == 64
    assert model_args.model_name_or_path == BUILTIN_TINY_MODEL
    assert (config.max_steps, config.grpo_mini_batch, config.num_generations) == (7, 2, 4)


def test_unknown_key_in_recipe_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path), "num_generation": 4}))
    with pytest.raises(ValueError, match="num_generation"):
        parse_train_args([str(path)])


def test_unknown_cli_flag_is_refused(recipe):
    with pytest.raises(ValueError, match="logit_chunk_multiplyer"):
        parse_train_args([str(recipe), "--logit_chunk_multiplyer", "2"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss_type", "ppo"], "loss_type must be one of"),
        (["--logit_chunk_multiplier", "0"], "logit_chunk_multiplier must be a positive integer"),
        (["--num_prompts", "0"], "num_prompts must be a positive integer, got 0"),
    ],
)
def test_bad_values_fail_before_any_model_is_built(recipe, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(["train", str(recipe), *flags])
    assert not (tmp_path / "run").exists()


def test_the_image_task_refuses_a_text_model_before_loading_it(recipe, tmp_path):
    with pytest.raises(ValueError, match=r"task='count_squares' puts an image .* is a tiny text-only Qwen3"):
        main(["train", str(recipe), "--task", "count_squares"])
    assert not (tmp_path / "run").exists()
    from trl_longctx.tiny_models import save_tiny_model

    text_model = save_tiny_model(tmp_path / "text")
    with pytest.raises(ValueError, match=r"is model_type 'qwen3', no vision_config. Use such a model, or task="):
        main(["train", str(recipe), "--task", "count_squares", "--model_name_or_path", str(text_model)])
    assert not (tmp_path / "run").exists()


def test_the_image_task_takes_a_vision_language_config(tmp_path):
    from transformers import Qwen2_5_VLConfig

    from trl_longctx.cli import check_vision_model

    Qwen2_5_VLConfig().save_pretrained(tmp_path)  # its config alone: nothing else is read
    check_vision_model("count_squares", str(tmp_path))


def test_bad_task_choice_is_refused(recipe, capsys):
    with pytest.raises(SystemExit):
        parse_train_args([str(recipe), "--task", "chess"])
    assert "copy_letter" in capsys.readouterr().err


def test_unknown_command():
    with pytest.raises(SystemExit, match="unknown command 'trian'; allowed: train"):
        main(["trian"])


def test_reward_function_import_errors():
    assert import_reward_function("trl_longctx.tasks.copy_letter_reward")(["p"], ["aa"], target=["a"]) == [1.0]
    with pytest.raises(ValueError, match="dotted import paths"):
        import_reward_function("copy_letter_reward")
    with pytest.raises(ValueError, match="cannot import"):
        import_reward_function("trl_longctx.tasks.nope")
    with pytest.raises(ValueError, match="not callable"):
        import_reward_function("trl_longctx.tasks.LETTERS")


def test_short_run_writes_run_files(recipe, tmp_path):
    main(["train", str(recipe)])
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert {"step", "reward", "loss", "peak_memory_mb"} <= record.keys()
        assert record["peak_memory_mb"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rollout_backend"] == "transformers" and summary["steps"] == 3
    assert (run / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob("*.tmp*"))
    # The built-in model was built in a temporary folder; the trained one is published where the summary says.
    assert summary["base_model"] == BUILTIN_TINY_MODEL and summary["model"] == str(run / "model")
    assert (run / "model" / "adapter_config.json").exists() or (run / "model" / "config.json").exists()


def test_metrics_file_appears_with_the_first_logged_step(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trl_longctx.metrics_callback import RunFilesCallback

    run = tmp_path / "run"
    callback, state = RunFilesCallback(run), TrainerState(global_step=0)
    args = TrainingArguments(output_dir=str(run), report_to="none")
    callback.on_train_begin(args, state, TrainerControl())
    assert not run.exists()  # a run whose first step fails leaves no empty metrics.jsonl
    state.global_step = 1
    callback.on_log(args, state, TrainerControl(), logs={"reward": 0.5, "loss": 1.0})
    assert [json.loads(line)["reward"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0.5]


def test_model_arguments_reach_the_trainer_as_in_trls_script(recipe):
    """The recipe's dtype, attention and 4-bit settings are not dropped: `model_init_kwargs` and the trainer's
    `quantization_config`, as `trl grpo` passes them (a 4-bit recipe once trained in bf16 without a word)."""
    from trl_longctx.cli import apply_model_arguments
    from trl_longctx.longctx_grpo_trainer import _quantization_config

    flags = ["--dtype", "float32", "--attn_implementation", "eager", "--load_in_4bit", "true",
             "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant", "true", "--use_peft", "true"]  # fmt: skip
    _, config, model_args = parse_train_args([str(recipe), *flags])
    quantization = apply_model_arguments(model_args, config)
    assert config.model_init_kwargs["dtype"] == "float32"
    assert config.model_init_kwargs["attn_implementation"] == "eager"
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_use_double_quant
    assert _quantization_config(config, {"quantization_config": quantization}) is quantization
    _, plain_config, plain_args = parse_train_args([str(recipe)])
    assert apply_model_arguments(plain_args, plain_config) is None
    _, kept, kept_args = parse_train_args([str(recipe), "--model_init_kwargs", '{"dtype": "bfloat16"}'])
    apply_model_arguments(kept_args, kept)
    assert kept.model_init_kwargs["dtype"] == "bfloat16"  # what the recipe put in model_init_kwargs wins
