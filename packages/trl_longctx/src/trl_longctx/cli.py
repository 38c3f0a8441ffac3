"""`longctx-grpo`: train `LongContextGRPOTrainer` from a YAML recipe plus command-line overrides, or plan its memory.

    longctx-grpo train configs/grpo/quickstart.yaml --max_steps 50 --output_dir runs/try
    longctx-grpo plan --model qwen3-8b --completion-length 65536

The recipe holds flat keys of `LongContextScriptArguments`, `LongContextGRPOConfig` and TRL's `ModelConfig`, and an
optional `env:` block, exactly as TRL's `TrlParser` reads them; command-line flags override the recipe.

TRL (and with it torch and transformers) is imported by `train` only: `plan`, `--help` and a wrong command answer
without it. `LongContextScriptArguments` subclasses TRL's `ScriptArguments`, so it is built on first use.
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config_checks import BUILTIN_TINY_MODEL, MODEL_RULES, SCRIPT_RULES, check_fields, check_model_path
from .tasks import TASKS

if TYPE_CHECKING:
    # Type checkers see the base class; at run time `__getattr__` serves the subclass.
    from trl import ModelConfig, TrlParser
    from trl import ScriptArguments as LongContextScriptArguments

    from .longctx_grpo_config import LongContextGRPOConfig

__all__ = ["BUILTIN_TINY_MODEL", "LongContextScriptArguments", "main", "make_parser", "parse_train_args", "train"]

COMMANDS = ("train", "plan")


@functools.cache
def _script_arguments_class() -> type:
    """`LongContextScriptArguments`, defined on first use (its base class is TRL's)."""
    from trl import ScriptArguments

    @dataclass
    class LongContextScriptArguments(ScriptArguments):
        """Script arguments of `longctx-grpo train`.

        Args:
            task: Built-in verifiable task (dataset and exact reward) used when `dataset_name` is not set.
            num_prompts: Number of prompts the built-in task generates.
            prompt_words: Filler words opening each prompt of the built-in task (long contexts without a data set of
                one's own; about one token per word); 0: none.
            reward_funcs: Dotted import paths of reward functions (`f(prompts, completions, **kw) -> list[float]`),
                used with `dataset_name`; nothing is imported that the user did not name.
        """

        task: str = field(default="copy_letter", metadata={"help": "Built-in task.", "choices": sorted(TASKS)})
        num_prompts: int = field(default=4096, metadata={"help": "Number of prompts of the built-in task."})
        prompt_words: int = field(
            default=0, metadata={"help": "Filler words opening each prompt of the built-in task (long contexts)."}
        )
        reward_funcs: list[str] | None = field(
            default=None, metadata={"help": "Dotted import paths of reward functions (with dataset_name)."}
        )

        def __post_init__(self):
            check_fields(self, SCRIPT_RULES)
            if self.dataset_name is not None and not self.reward_funcs:
                raise ValueError(
                    "reward_funcs must name at least one reward function (dotted import path) with dataset_name."
                )

    # Found by pickle and by `trl_longctx.cli.LongContextScriptArguments` (`__getattr__` below) under this name.
    LongContextScriptArguments.__qualname__ = "LongContextScriptArguments"
    return LongContextScriptArguments


def __getattr__(name: str):
    if name == "LongContextScriptArguments":
        return _script_arguments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_parser() -> TrlParser:
    """The `TrlParser` over (`LongContextScriptArguments`, `LongContextGRPOConfig`, `ModelConfig`)."""
    from trl import ModelConfig, TrlParser

    from .longctx_grpo_config import LongContextGRPOConfig

    dataclasses = (_script_arguments_class(), LongContextGRPOConfig, ModelConfig)
    return TrlParser(dataclasses, prog="longctx-grpo train")


def parse_train_args(argv: list[str]):
    """Parse `[recipe.yaml] [--flag value ...]` into the three dataclasses (recipe first, flags override).

    Every value is checked here (`trl_longctx.config_checks`), so a bad one is refused before anything is loaded or
    written.

    Raises:
        ValueError: Naming the field, the value and what is allowed.
    """
    args = list(argv)
    if args and not args[0].startswith("-"):
        args = ["--config", args[0], *args[1:]]
    script_args, training_args, model_args = make_parser().parse_args_and_config(args)
    check_fields(model_args, MODEL_RULES)
    check_model_path(model_args.model_name_or_path)
    return script_args, training_args, model_args


def import_reward_function(path: str):
    """Import `package.module.function` named by the user.

    Raises:
        ValueError: If the path has no module part, or the module or attribute does not exist, or it is not callable.
    """
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"reward_funcs entries must be dotted import paths like 'my_pkg.rewards.fn', got {path!r}.")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward_funcs: cannot import {path!r}: {error}") from error
    if not callable(function):
        raise ValueError(f"reward_funcs: {path!r} is not callable.")
    return function


def apply_model_arguments(model_args: ModelConfig, training_args: LongContextGRPOConfig):
    """Give the config the model-loading arguments of the recipe, as TRL's own `trl grpo` script does: revision,
    `attn_implementation` and `dtype` into `model_init_kwargs` (values the recipe set there win), and return the
    quantization config (`load_in_4bit`, `bnb_4bit_quant_type`, ...; `None` without quantization) for the trainer's
    `quantization_config` argument. The config is the one this command built from the recipe.
    """
    from trl import get_quantization_config

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    training_args.model_init_kwargs = model_init_kwargs
    return get_quantization_config(model_args)


def train(script_args: LongContextScriptArguments, training_args: LongContextGRPOConfig, model_args: ModelConfig):
    """Build the dataset, rewards and model named by the arguments, then train and save the run files.

    The run files (`metrics.jsonl`, `summary.json`, `reward.png`) appear in `output_dir` once training logs; the
    built-in tiny model is written to a temporary folder that lasts as long as this call, so a run that fails to
    start leaves nothing behind in `output_dir` (the trainer itself creates the empty folder).
    """
    import tempfile
    from pathlib import Path

    from trl import get_peft_config

    from .checkpoints import FINAL_MODEL_DIR, save_final_model
    from .longctx_grpo_trainer import LongContextGRPOTrainer
    from .metrics_callback import RunFilesCallback
    from .tasks import get_task

    if script_args.dataset_name is None:
        task = get_task(script_args.task)
        if task.vision:
            check_vision_model(script_args.task, model_args.model_name_or_path)
        dataset = task.make_dataset(
            script_args.num_prompts, seed=training_args.seed, prompt_words=script_args.prompt_words
        )
        reward_funcs = [task.reward]
    else:
        from datasets import load_dataset

        reward_funcs = [import_reward_function(p) for p in script_args.reward_funcs]
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)[
            script_args.dataset_train_split
        ]
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty.")
    peft_config = get_peft_config(model_args)
    quantization_config = apply_model_arguments(model_args, training_args)

    with tempfile.TemporaryDirectory(prefix="longctx-tiny-model-") as scratch:
        model = model_args.model_name_or_path
        if model == BUILTIN_TINY_MODEL:
            from .tiny_models import save_tiny_model

            # Random weights from the seed: the same model every time, so nothing of it needs keeping.
            model = str(save_tiny_model(Path(scratch) / "model", seed=training_args.seed))
        trainer = LongContextGRPOTrainer(
            model=model, reward_funcs=reward_funcs, args=training_args, train_dataset=dataset, peft_config=peft_config,
            quantization_config=quantization_config,
        )  # fmt: skip
        rollout = "vllm" if trainer.use_vllm else "transformers"
        # The trained adapter (or model) is published there, complete or not at all, once training ends.
        trained = Path(training_args.output_dir) / FINAL_MODEL_DIR
        summary = {"rollout_backend": rollout, "model": str(trained), "base_model": model_args.model_name_or_path}
        trainer.add_callback(RunFilesCallback(training_args.output_dir, extra_summary=summary))
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        save_final_model(trainer)
    return trainer


def check_vision_model(task: str, model: str) -> None:
    """Refuse a text-only `model` for the image task `task`, from its config alone (no weights are loaded).

    Raises:
        ValueError: Naming `model_name_or_path`, its model type and what the task needs.
    """
    if model == BUILTIN_TINY_MODEL:
        model_type = "a tiny text-only Qwen3"
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        if getattr(config, "vision_config", None) is not None:
            return
        model_type = f"model_type {config.model_type!r}, no vision_config"
    raise ValueError(
        f"task={task!r} puts an image in every prompt and needs a vision-language model (a config with a "
        f"vision_config, e.g. Qwen2.5-VL or Qwen3-VL); model_name_or_path={model!r} is {model_type}. Use such a "
        "model, or task='copy_letter' for a text model."
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `longctx-grpo` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: longctx-grpo {{{','.join(COMMANDS)}}} [recipe.yaml] [--flag value ...]")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"longctx-grpo: unknown command {command!r}; allowed: {', '.join(COMMANDS)}.")
    if command == "plan":
        from .memory.plan_cli import main as plan_main

        plan_main(rest)
        return
    script_args, training_args, model_args = parse_train_args(rest)
    end_run(train(script_args, training_args, model_args))


def end_run(trainer) -> None:
    """End the run as Accelerate asks of a script (`Accelerator.end_training`): once every rank is done, shut the
    colocated vLLM engine down and leave the process group; a no-op in one process without vLLM.

    A rank that exits with its group alive aborts at interpreter exit now and then ("terminate called without an
    active exception", SIGABRT) after its work is done and saved. The engine goes first: its teardown destroys the
    groups it made and the default one, so left to run at interpreter exit, after `end_training`, it raised on
    each rank ("Invalid process group specified"). Under `sequence_parallel_size > 1` DeepSpeed's registry of
    Ulysses groups is cleared too (`sequence_parallel.leave_process_group`).
    """
    trainer.accelerator.wait_for_everyone()
    engine = getattr(getattr(trainer, "vllm_generation", None), "llm", None)  # colocate mode only
    if engine is not None:
        engine.llm_engine.engine_core.shutdown()
    if trainer.sequence_parallel is not None:
        from .sequence_parallel import leave_process_group

        leave_process_group()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
