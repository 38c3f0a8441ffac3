"""The allowed values of every configuration field the trainer and the CLI use, as data, and the checks applying them.

`LongContextGRPOConfig.__post_init__` runs `check_fields(config, CONFIG_RULES)` and `check_paths(config)` before
TRL's own `__post_init__` (whose arithmetic would otherwise fail on a zero or a list first) and
`check_combinations(config)` after it. The CLI applies `SCRIPT_RULES` and `MODEL_RULES` to its other two dataclasses.
So a bad value is refused when the configuration is built, before any model, engine or file exists, with the field,
the value and what is allowed. The README's "Bad values" table is `rules_markdown()` and the tests iterate over the
same rules.

What TRL and transformers already refuse with a clear message before anything loads is left to them (e.g.
`generation_batch_size` not divisible by `num_generations`, `generation_batch_size` with `steps_per_generation`,
`lr_scheduler_type` or `save_strategy` outside their enums, `bf16` with `fp16`); `TRL_CHECKED` lists those.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .tasks import TASKS

# Categories of the rules, in the order the README lists them.
CATEGORIES = ("lengths", "counts", "ratios", "flags", "choices", "paths")
# numpy's seeding accepts 0 .. 2**32 - 1; transformers seeds numpy with `seed` and `data_seed`.
_MAX_SEED = 2**32 - 1
# `model_name_or_path` of the built-in tiny model (`trl_longctx.tiny_models`), which the CLI builds locally.
BUILTIN_TINY_MODEL = "builtin:tiny-qwen3"


@dataclass(frozen=True)
class FieldRule:
    """The allowed values of one field.

    Args:
        name: The dataclass field.
        kind: `"int"` (not a bool), `"number"` (an int or a finite float, not a bool), `"bool"` or `"choice"`.
        category: One of `CATEGORIES`.
        low: Lowest allowed value of an int or number, or `None` for no bound.
        high: Highest allowed value, or `None`.
        low_open: `low` itself is not allowed.
        high_open: `high` itself is not allowed.
        none: What `None` means when it is allowed (`None`: not allowed).
        special: Other allowed values and their meanings, e.g. `((-1, "use num_train_epochs"),)`.
        choices: The allowed values of a `"choice"`.
        example: A bad value, for the README and the tests.
        other_spellings: Values refused because their meaning has one allowed spelling, each paired with it:
            `(("off", None),)` refuses `"off"`, naming `None` and what it means (`none`, or its meaning in `special`).
    """

    name: str
    kind: str
    category: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: str | None = None
    special: tuple[tuple[object, str], ...] = ()
    choices: tuple = ()
    example: object = None
    other_spellings: tuple[tuple[object, object], ...] = ()

    def allowed(self) -> str:
        """What is allowed, in words: `"a positive integer or None (automatic)"`."""
        if self.kind == "choice":
            listed = f"one of {list(self.choices)}"
            return f"None or {listed}" if self.none is not None else listed
        if self.kind == "bool":
            parts = ["True", "False"]
        else:
            parts = [_describe_range(self)]
        parts += [f"{value!r} ({meaning})" for value, meaning in self.special]
        if self.none is not None:
            parts.append(f"None ({self.none})")
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]

    def problem(self, value) -> str | None:
        """The error message for `value`, or `None` when it is allowed."""
        for spelling, allowed in self.other_spellings:
            if _same(value, spelling):
                meaning = self._meaning(allowed)
                return f"{self.name} must be {self.allowed()}, got {value!r}: write {allowed!r} for {meaning}."
        if value is None and self.none is not None:
            return None
        if any(_same(value, allowed) for allowed, _ in self.special):
            return None
        if self.kind == "choice":
            return None if any(_same(value, choice) for choice in self.choices) else self._message(value, False)
        wrong_type = {
            "bool": not isinstance(value, bool),
            "int": isinstance(value, bool) or not isinstance(value, numbers.Integral),
            "number": isinstance(value, bool) or not isinstance(value, numbers.Real),
        }[self.kind]
        if wrong_type:
            return self._message(value, True)
        if self.kind == "bool":
            return None
        if not math.isfinite(value) or not _in_range(self, value):
            return self._message(value, False)
        return None

    def _meaning(self, allowed) -> str:
        """What the allowed value `allowed` means (the text `other_spellings` errors point to)."""
        if allowed is None:
            return self.none
        return next((meaning for value, meaning in self.special if _same(value, allowed)), repr(allowed))

    def _message(self, value, wrong_type: bool) -> str:
        got = f"{value!r} ({_a(type(value).__name__)})" if wrong_type and value is not None else repr(value)
        return f"{self.name} must be {self.allowed()}, got {got}."


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _same(value, allowed) -> bool:
    """`value == allowed` without `True == 1` or `1.0 == True` counting as equal."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    try:
        return bool(value == allowed)
    except Exception:  # an exotic type whose == raises is simply not an allowed value
        return False


def _in_range(rule: FieldRule, value) -> bool:
    if rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low)):
        return False
    return not (rule.high is not None and (value > rule.high or (rule.high_open and value == rule.high)))


def _describe_range(rule: FieldRule) -> str:
    noun = "an integer" if rule.kind == "int" else "a number"
    if rule.high is None:
        if rule.kind == "int" and rule.low == 1 and not rule.low_open:
            return "a positive integer"
        if rule.kind == "int" and rule.low == 0 and not rule.low_open:
            return "a non-negative integer"
        if rule.low is None:
            return noun
        return f"{noun} {'>' if rule.low_open else '>='} {_number(rule.low)}"
    if rule.low is None:
        return f"{noun} {'<' if rule.high_open else '<='} {_number(rule.high)}"
    left, right = "(" if rule.low_open else "[", ")" if rule.high_open else "]"
    return f"{noun} in {left}{_number(rule.low)}, {_number(rule.high)}{right}"


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _int(name, category, low=1, high=None, none=None, special=(), example=0):
    return FieldRule(name, "int", category, low=low, high=high, none=none, special=special, example=example)


def _num(name, low=None, high=None, low_open=False, high_open=False, none=None, category="ratios", example=-1.0):
    return FieldRule(name, "number", category, low, high, low_open, high_open, none=none, example=example)


def _flag(name, none=None, example="yes"):
    return FieldRule(name, "bool", "flags", none=none, example=example)


def _choice(name, choices, none=None, example="unknown", other_spellings=()):
    return FieldRule(
        name, "choice", "choices", none=none, choices=tuple(choices), example=example, other_spellings=other_spellings
    )


# Loss types TRL 1.16's `GRPOTrainer._compute_loss` implements. TRL only rejects an unknown one inside the first
# training step; we reject it at configuration time, before any model is loaded.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
LOGPROB_BACKENDS = ("auto", "torch", "triton")
# How the log-prob pass lays the sequences out for the decoder (`trl_longctx.training_layout`); the first is TRL's.
TRAINING_LAYOUTS = ("padded", "packed", "shared-prompt")
VLLM_KV_CACHE_SIZINGS = ("rollout", "utilization")
# `vllm_fp8_weights`: the scale layouts of vLLM's online FP8 quantization (`vllm_standby.shared_fp8.VLLM_QUANTIZATION`;
# kept here as text so that the config imports neither vllm_standby's torch code nor vLLM).
VLLM_FP8_WEIGHTS = ("per-channel", "per-tensor", "per-block")
# `vllm_fp8_matmul`: the trainer's matmul on FP8 weights (`vllm_standby.fp8_linear.MATMULS` without "auto", which
# resolves to "dequantize"; kept here as text for the same reason; a test checks it against vllm_standby).
VLLM_FP8_MATMULS = ("dequantize", "scaled_mm")
# Names of `trl_longctx.compile_regions.COMPILE_SETTINGS` (kept here so the config imports no torch.compile code);
# a test checks that the two lists agree. Not compiled is `None`, the one spelling of it.
COMPILE_DECODER_SETTINGS = (
    "layers",
    "layers-dynamic",
    "layers-mark-dynamic",
    "layers-max-autotune-no-cudagraphs",
    "model",
)
_AUTO = "automatic"
_PORT = {"low": 1, "high": 65535, "example": 70000}

# `LongContextGRPOConfig`: our fields and the TRL / transformers fields the trainer passes on. TRL 1.16 checks these
# either not at all, or only once the model and vLLM are built (sampling values in vLLM's `SamplingParams`, the
# memory utilization in vLLM's pydantic config, choices inside the first step), or by failing arithmetic (a zero
# batch size or `num_generations=0` divides by zero in `GRPOConfig.__post_init__`).
CONFIG_RULES: tuple[FieldRule, ...] = (
    _int("max_completion_length", "lengths"),
    _int("vllm_max_model_length", "lengths", none="from the model config"),
    _int("per_device_train_batch_size", "counts"),
    _int("per_device_eval_batch_size", "counts"),
    _int("gradient_accumulation_steps", "counts"),
    # GRPO's advantages are rewards minus the mean of the prompt's group: one generation has no group.
    _int("num_generations", "counts", low=2, example=1),
    _int("max_consecutive_nonfinite", "counts"),
    _int("num_generations_eval", "counts", none="num_generations"),
    _int("generation_batch_size", "counts", none="per_device_train_batch_size x processes x steps_per_generation"),
    _int("steps_per_generation", "counts", none="gradient_accumulation_steps"),
    _int("num_iterations", "counts"),
    # transformers runs num_train_epochs for any max_steps <= 0; only its default, -1, says so on purpose.
    _int("max_steps", "counts", special=((-1, "use num_train_epochs"),)),
    _num("num_train_epochs", low=0, low_open=True, category="counts", example=0),
    # A logging/saving/eval interval below 1 is a fraction of the run (transformers); 0 divides by zero.
    _num("logging_steps", low=0, low_open=True, category="counts", example=-5),
    _num("save_steps", low=0, low_open=True, category="counts", example=0),
    _num("eval_steps", low=0, low_open=True, none="logging_steps", category="counts", example=0),
    _num("warmup_steps", low=0, category="counts", example=-1),
    _int("save_total_limit", "counts", none="keep every checkpoint"),
    _int("dataloader_num_workers", "counts", low=0, example=-1),
    _int("ref_model_sync_steps", "counts"),
    _int("top_k", "counts", low=0, special=(), example=-1),
    _int("vllm_tensor_parallel_size", "counts"),
    _int("vllm_server_port", "counts", **_PORT),
    _int("vllm_group_port", "counts", **_PORT),
    _int("seed", "counts", low=0, high=_MAX_SEED, example=-1),
    _int("data_seed", "counts", low=0, high=_MAX_SEED, none="seed", example=-1),
    _int("grpo_mini_batch", "counts", none=_AUTO),
    _int("logit_chunk_multiplier", "counts", none=_AUTO),
    _int("tiled_mlp_chunks", "counts", none=_AUTO),
    _int("sequence_parallel_size", "counts"),
    _num("vllm_gpu_memory_utilization", low=0, high=1, low_open=True, example=1.5),
    _num("learning_rate", low=0),
    # TRL divides the logits by the temperature (0 is not greedy decoding here but a division by zero).
    _num("temperature", low=0, low_open=True, example=0.0),
    _num("top_p", low=0, high=1, low_open=True, example=0.0),
    _num("min_p", low=0, high=1, none="off", example=2.0),
    _num("repetition_penalty", low=0, low_open=True, example=0.0),
    _num("beta", low=0),
    _num("epsilon", low=0),
    _num("epsilon_high", low=0, none="epsilon"),
    _num("delta", low=0, low_open=True, none="off"),
    _num("sapo_temperature_neg", low=0, low_open=True),
    _num("sapo_temperature_pos", low=0, low_open=True),
    _num("top_entropy_quantile", low=0, high=1, example=1.5),
    _num("ref_model_mixup_alpha", low=0, high=1, example=1.5),
    _num("vllm_importance_sampling_clip_max", low=0, low_open=True, none="no upper bound"),
    _num("vllm_importance_sampling_clip_min", low=0, none="no lower bound"),
    _num("off_policy_mask_threshold", low=0, low_open=True, none="off"),
    _num("router_aux_loss_coef", low=0, none="the model config's"),
    _num("vllm_server_timeout", low=0, low_open=True, example=0),
    _num("weight_decay", low=0),
    _num("max_grad_norm", low=0, none="no clipping"),
    # torch's AdamW refuses these only when the optimizer is built, after the model.
    _num("adam_beta1", low=0, high=1, high_open=True, example=1.0),
    _num("adam_beta2", low=0, high=1, high_open=True, example=1.0),
    _num("adam_epsilon", low=0),
    _flag("use_vllm"),
    _flag("use_vllm_when_available"),
    _flag("vllm_enable_sleep_mode"),
    _flag("vllm_kv_standby", none=_AUTO),
    _flag("vllm_shared_weights", none=_AUTO),
    _flag("vllm_merge_adapter", none=_AUTO),
    _flag("vllm_prefix_caching"),
    _flag("vllm_importance_sampling_correction"),
    _flag("gradient_checkpointing"),
    _flag("offload_checkpoints", none=_AUTO),
    _flag("flex_attention", none=_AUTO),
    _flag("skip_nonfinite_steps"),
    _flag("retry_on_oom"),
    _flag("warm_up_kernels"),
    _flag("use_cpu"),
    _flag("bf16", none=_AUTO),
    _flag("fp16"),
    _flag("mask_truncated_completions"),
    _flag("disable_dropout"),
    _flag("sync_ref_model"),
    _flag("log_completions"),
    _choice("loss_type", LOSS_TYPES, example="ppo"),
    _choice("logprob_backend", LOGPROB_BACKENDS, example="cuda"),
    _choice("training_layout", TRAINING_LAYOUTS, example="unpadded"),
    _choice("vllm_kv_cache_sizing", VLLM_KV_CACHE_SIZINGS, example="max"),
    _choice("vllm_fp8_weights", VLLM_FP8_WEIGHTS, none="the checkpoint's dtype, no FP8", example="fp8"),
    _choice("vllm_fp8_matmul", VLLM_FP8_MATMULS, example="fp8"),
    # "off" and "eager" were also accepted for not compiled, before None became its one spelling.
    _choice(
        "compile_decoder_layers",
        COMPILE_DECODER_SETTINGS,
        none="not compiled",
        example="fast",
        other_spellings=(("off", None), ("eager", None)),
    ),
    _choice("vllm_mode", ("colocate", "server"), example="remote"),
    _choice("vllm_model_impl", ("vllm", "transformers")),
    _choice("importance_sampling_level", ("token", "sequence"), example="prompt"),
    # TRL maps True to "group" and False to "none".
    _choice("scale_rewards", ("group", "batch", "none", True, False), example="std"),
    _choice("multi_objective_aggregation", ("sum_then_normalize", "normalize_then_sum")),
    _choice("vllm_importance_sampling_mode", ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")),
)

# `longctx-grpo train`'s `LongContextScriptArguments`.
SCRIPT_RULES: tuple[FieldRule, ...] = (
    _choice("task", sorted(TASKS), example="chess"),
    _int("num_prompts", "counts"),
    _int("prompt_words", "counts", low=0, example=-1),
)

# TRL's `ModelConfig`, as the CLI uses it (`get_peft_config` builds PEFT's `LoraConfig` from these).
MODEL_RULES: tuple[FieldRule, ...] = (
    _int("lora_r", "counts"),
    _int("lora_alpha", "counts"),
    _num("lora_dropout", low=0, high=1, high_open=True, example=1.0),
    _flag("use_peft"),
    _flag("load_in_4bit"),
    _flag("load_in_8bit"),
    _choice("dtype", ("auto", "bfloat16", "float16", "float32"), none="the checkpoint's", example="bf16"),
)

# Checks TRL or transformers make with a message naming the field(s), before anything loads; not repeated here
# (`tests/test_bad_values.py` checks that they still fire).
TRL_CHECKED = {
    "generation_batch_size": "must be divisible by the global batch size and by num_generations",
    "steps_per_generation": "not together with generation_batch_size",
    "lr_scheduler_type": "one of transformers' SchedulerType values",
    "save_strategy": "one of 'no', 'steps', 'epoch', 'best'",
    "bf16": "not together with fp16",
    "vllm_importance_sampling_clip_min": "below vllm_importance_sampling_clip_max",
    "auto_find_batch_size": "False (GRPO's groups need a fixed batch size)",
}


def check_fields(obj, rules: tuple[FieldRule, ...]) -> None:
    """Check the fields of `obj` named by `rules`.

    Raises:
        ValueError: On the first field whose value a rule does not allow, naming the field, the value and what is
            allowed.
    """
    for rule in rules:
        message = rule.problem(getattr(obj, rule.name))
        if message is not None:
            raise ValueError(message)


PATH_RULES: dict[str, str] = {
    "output_dir": "a folder path that can be created (no part of it an existing file)",
    "resume_from_checkpoint": "None, True (the last checkpoint-N in output_dir) or a checkpoint folder holding "
    "trainer_state.json",
}


def check_paths(config) -> None:
    """Check `output_dir` and `resume_from_checkpoint` of a `LongContextGRPOConfig` (`PATH_RULES`).

    Nothing is created: the output folder is made by the trainer once the run can start.

    Raises:
        ValueError: Naming the field, the value and what is allowed.
    """
    output_dir = config.output_dir
    if output_dir is not None:
        if not isinstance(output_dir, str | os.PathLike):
            raise ValueError(f"output_dir must be {PATH_RULES['output_dir']}, got {output_dir!r}.")
        blocking = _existing_file_on(Path(os.path.expanduser(output_dir)))
        if blocking is not None:
            raise ValueError(
                f"output_dir must be {PATH_RULES['output_dir']}, got {str(output_dir)!r}: {str(blocking)!r} is a file."
            )
    resume = config.resume_from_checkpoint
    if resume is None or resume is False:
        return
    allowed = PATH_RULES["resume_from_checkpoint"]
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        folder = Path(os.path.expanduser(output_dir or "trainer_output"))
        if not folder.is_dir() or get_last_checkpoint(str(folder)) is None:
            raise ValueError(
                f"resume_from_checkpoint must be {allowed}, got True, but output_dir {str(folder)!r} holds no "
                "checkpoint-N folder."
            )
        return
    if not isinstance(resume, str | os.PathLike):
        raise ValueError(f"resume_from_checkpoint must be {allowed}, got {resume!r} ({_a(type(resume).__name__)}).")
    path = Path(os.path.expanduser(resume))
    if not (path / "trainer_state.json").is_file():
        why = "holds no trainer_state.json" if path.is_dir() else "does not exist"
        raise ValueError(f"resume_from_checkpoint must be {allowed}, got {str(resume)!r}: that folder {why}.")


def _existing_file_on(path: Path) -> Path | None:
    """The first existing part of `path` (itself or an ancestor) when that is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


MODEL_PATH_ALLOWED = "a model folder holding config.json, a Hub id such as 'org/name', or {builtin!r}"


def check_model_path(name) -> None:
    """Check `model_name_or_path` of the CLI's `ModelConfig`.

    A name that can only be a local path (absolute, starting with `.` or `~`, or with more than one `/`, which a Hub
    id cannot have) must be a folder holding `config.json`; anything else is left to transformers as a Hub id.

    Args:
        name: The value of `model_name_or_path`; `BUILTIN_TINY_MODEL` is allowed too.

    Raises:
        ValueError: Naming the field, the value and what is allowed.
    """
    allowed = MODEL_PATH_ALLOWED.format(builtin=BUILTIN_TINY_MODEL)
    if not isinstance(name, str) or not name:
        got = f"{name!r} ({_a(type(name).__name__)})" if name is not None else "None"
        raise ValueError(f"model_name_or_path must be {allowed}, got {got}.")
    if name == BUILTIN_TINY_MODEL:
        return
    path = Path(os.path.expanduser(name))
    local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.exists()
    if local and not (path / "config.json").is_file():
        why = "holds no config.json" if path.is_dir() else "does not exist"
        raise ValueError(f"model_name_or_path must be {allowed}, got {name!r}: that folder {why}.")


@dataclass(frozen=True)
class Combination:
    """A rule over several fields, checked after TRL's `__post_init__` (so `use_vllm` and the batch are resolved).

    Args:
        fields: The fields involved.
        allowed: What is allowed, in words (the README's text).
        check: `check(config)` returns the error message, or `None` when the combination is allowed.
    """

    fields: tuple[str, ...]
    allowed: str
    check: Callable[[object], str | None]


def _vespo_token_mode(config) -> str | None:
    # TRL 1.16 raises this only in `GRPOTrainer.__init__`, after the model is loaded.
    from .rollout_plan import wants_vllm

    if config.loss_type != "vespo" or not wants_vllm(config) or not config.vllm_importance_sampling_correction:
        return None
    if config.vllm_importance_sampling_mode in ("token_truncate", "token_mask"):
        return None
    return (
        "vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask' with loss_type='vespo', use_vllm and "
        f"vllm_importance_sampling_correction, got {config.vllm_importance_sampling_mode!r}."
    )


def _sync_ref_needs_beta(config) -> str | None:
    # TRL 1.16 raises this only in `GRPOTrainer.__init__`, after the model is loaded.
    if config.sync_ref_model and config.beta == 0.0:
        return "sync_ref_model=True needs beta > 0 (with beta=0.0 no reference model exists to synchronize)."
    return None


def _backend_runs_here(config) -> str | None:
    # The trainer resolves the backend again before it loads anything; refusing here also spares the CLI its model.
    from .logprob_pass import resolved_backend

    try:
        resolved_backend(config, config.device)
    except RuntimeError as error:
        return f"logprob_backend must be 'auto' or 'torch' on {config.device.type}, got {config.logprob_backend!r}: {error}"
    except ValueError as error:
        return str(error)
    return None


def _offload_needs_checkpointing(config) -> str | None:
    if config.offload_checkpoints and not config.gradient_checkpointing:
        return "offload_checkpoints=True needs gradient_checkpointing=True (it offloads checkpoints)."
    return None


def _flex_attention_on_cuda(config) -> str | None:
    # Compiled flex attention runs its fused kernels on CUDA; torch has no flex attention backward on CPU.
    if config.flex_attention is True and config.device.type != "cuda":
        return (
            f"flex_attention must be None or False when training on {config.device.type}, got True: torch's flex "
            "attention has no backward on CPU and runs fused (memory linear in the sequence) only compiled on CUDA."
        )
    return None


def _fp8_weights_settings(config) -> str | None:
    # What the config alone says FP8 shared weights cannot have; the rollout plan checks the rest (vLLM, the GPU).
    kind = config.vllm_fp8_weights
    if kind is None:
        return None
    if config.vllm_shared_weights is False:
        return (
            f"vllm_fp8_weights={kind!r} needs vllm_shared_weights=None or True (the trainer's FP8 layers are views of "
            "vLLM's weights), got False; or set vllm_fp8_weights=None."
        )
    if config.vllm_merge_adapter:
        return (
            f"vllm_fp8_weights={kind!r} needs vllm_merge_adapter=None or False: a LoRA adapter cannot be merged into "
            "FP8 weights exactly (the adapter reaches vLLM as an in-memory LoRA request), got True."
        )
    if not config.vllm_importance_sampling_correction:
        return (
            f"vllm_fp8_weights={kind!r} needs vllm_importance_sampling_correction=True: the FP8 sampler's log-probs "
            "differ from the trainer's, and TRL corrects for it (and logs sampling/sampling_logp_difference) only "
            "with it; got False."
        )
    return None


def _fp8_matmul_needs_row_scales(config) -> str | None:
    # torch._scaled_mm takes one scale per row of each operand: per-tensor or per-channel weight scales, not blocks.
    if config.vllm_fp8_matmul != "scaled_mm" or config.vllm_fp8_weights in ("per-channel", "per-tensor"):
        return None
    return (
        f"vllm_fp8_matmul='scaled_mm' needs vllm_fp8_weights='per-channel' or 'per-tensor' (torch._scaled_mm takes a "
        f"scale per weight row or one per weight), got vllm_fp8_weights={config.vllm_fp8_weights!r}; or set "
        "vllm_fp8_matmul='dequantize'."
    )


def _packed_layout_needs_flex_on_cuda(config) -> str | None:
    # On CUDA the packed rows' masks are flex attention BlockMasks; any other attention takes them dense.
    if config.training_layout != "padded" and config.flex_attention is False and config.device.type == "cuda":
        return (
            f"flex_attention must be None or True with training_layout={config.training_layout!r} on CUDA, got "
            "False: the model's own attention would take the packed rows' mask dense, [tokens, tokens], growing "
            "with the square of the tokens. Allowed: flex_attention=None or True, or training_layout='padded'."
        )
    return None


def _sequence_parallel_divides_world(config) -> str | None:
    # Groups are consecutive ranks; a remainder would leave ranks in no group. `world_size` is what TRL's own
    # `__post_init__` reads (the launcher's process count), known before any model loads.
    size, world = config.sequence_parallel_size, config.world_size
    if size == 1 or world % size == 0:
        return None
    allowed = [d for d in range(1, world + 1) if world % d == 0]
    return (
        f"sequence_parallel_size must divide the number of processes ({world}), got {size}: consecutive ranks form "
        f"groups of that size. Allowed with {world} process(es): {allowed}."
    )


def _sequence_parallel_settings(config) -> str | None:
    # What the config alone says Ulysses does not compose with (the trainer refuses the model-dependent rest).
    size = config.sequence_parallel_size
    if size == 1:
        return None
    if config.training_layout != "padded":
        return (
            f"training_layout must be 'padded' with sequence_parallel_size={size}, got {config.training_layout!r}: "
            "Ulysses takes no attention mask, so each row runs as its own sequence. Or set sequence_parallel_size=1."
        )
    if config.compile_decoder_layers is not None:
        return (
            f"compile_decoder_layers must be None with sequence_parallel_size={size}, got "
            f"{config.compile_decoder_layers!r}: compiled layers around Ulysses' all-to-all are not tested. Or set "
            "sequence_parallel_size=1."
        )
    if config.fsdp or config.deepspeed:
        wrapper = "fsdp" if config.fsdp else "deepspeed"
        return (
            f"{wrapper} must be unset with sequence_parallel_size={size}: sequence parallelism is tested with DDP "
            "only (FSDP and DeepSpeed ZeRO reduce and shard the gradients their own way). Or set "
            "sequence_parallel_size=1."
        )
    return None


COMBINATIONS: tuple[Combination, ...] = (
    Combination(
        ("vllm_importance_sampling_mode", "loss_type"),
        "a token_* mode with loss_type='vespo' and vLLM importance sampling",
        _vespo_token_mode,
    ),
    Combination(
        ("logprob_backend", "logit_chunk_multiplier"),
        "'triton' only where it runs (CUDA, or TRITON_INTERPRET=1), and then logit_chunk_multiplier=None",
        _backend_runs_here,
    ),
    Combination(("sync_ref_model", "beta"), "sync_ref_model=True only with beta > 0", _sync_ref_needs_beta),
    Combination(
        ("vllm_fp8_weights", "vllm_shared_weights", "vllm_merge_adapter", "vllm_importance_sampling_correction"),
        "vllm_fp8_weights only with vllm_shared_weights None or True, vllm_merge_adapter None or False, and "
        "vllm_importance_sampling_correction=True",
        _fp8_weights_settings,
    ),
    Combination(
        ("vllm_fp8_matmul", "vllm_fp8_weights"),
        "vllm_fp8_matmul='scaled_mm' only with vllm_fp8_weights 'per-channel' or 'per-tensor'",
        _fp8_matmul_needs_row_scales,
    ),
    Combination(
        ("offload_checkpoints", "gradient_checkpointing"),
        "offload_checkpoints=True only with gradient_checkpointing=True",
        _offload_needs_checkpointing,
    ),
    Combination(
        ("flex_attention", "use_cpu"),
        "flex_attention=True only when training on CUDA (not with use_cpu=True, nor without a GPU)",
        _flex_attention_on_cuda,
    ),
    Combination(
        ("training_layout", "flex_attention"),
        "a training_layout other than 'padded' on CUDA only with flex_attention None or True",
        _packed_layout_needs_flex_on_cuda,
    ),
    Combination(
        ("sequence_parallel_size",),
        "a divisor of the number of processes (the launcher's world size)",
        _sequence_parallel_divides_world,
    ),
    Combination(
        ("sequence_parallel_size", "training_layout", "compile_decoder_layers", "fsdp", "deepspeed"),
        "sequence_parallel_size > 1 only with training_layout='padded', compile_decoder_layers=None and neither "
        "fsdp nor deepspeed",
        _sequence_parallel_settings,
    ),
)


def check_combinations(config) -> None:
    """Check `COMBINATIONS` on a `LongContextGRPOConfig` whose TRL `__post_init__` has run.

    Raises:
        ValueError: Naming the fields, their values and what is allowed.
    """
    for combination in COMBINATIONS:
        message = combination.check(config)
        if message is not None:
            raise ValueError(message)


def rules_markdown() -> str:
    """The README's table of every rule: field, category, what is allowed (one row per field)."""
    rows = ["| field | category | allowed |", "| --- | --- | --- |"]
    for rule in (*CONFIG_RULES, *SCRIPT_RULES, *MODEL_RULES):
        rows.append(f"| `{rule.name}` | {rule.category} | {rule.allowed()} |")
    rows += [f"| `{name}` | paths | {allowed} |" for name, allowed in PATH_RULES.items()]
    rows.append(f"| `model_name_or_path` | paths | {MODEL_PATH_ALLOWED.format(builtin=BUILTIN_TINY_MODEL)} |")
    rows += [f"| `{', '.join(c.fields)}` | combinations | {c.allowed} |" for c in COMBINATIONS]
    return "\n".join(rows)
