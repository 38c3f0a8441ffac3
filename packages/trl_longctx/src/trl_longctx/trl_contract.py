"""What `LongContextGRPOTrainer` relies on in TRL and transformers, declared as data and checked when it is built.

The trainer subclasses `trl.GRPOTrainer` and overrides private methods, reads attributes TRL's `__init__` sets and
builds TRL's `VLLMGeneration` itself for the shared-weights engine; `moe_aux` computes the MoE router aux loss as a
module-level function of TRL does (`add_fused_lm_head`) and calls the transformers function it calls. None of that is
public API: a TRL release can rename a hook, change its parameters or stop calling it, and an override would then be
dead code or fail deep in a step, or a mirrored computation would silently drift from TRL's. `vision_language`
calls two of TRL's module-level helpers to split image inputs per sequence. Each `Hook` below names one such thing
with the reason we rely on it, where it is upstream and what to review when it changes; `check_trl_contract()`
verifies the installed libraries against them when the trainer is built, and the contract tests
(`tests/test_trl_contract.py`) are generated from the same data.

What is checked, per hook:
- the attribute (a method looked up on a class, or a module-level function) exists and is callable, with the
  parameter names we call or override it with;
- `calls`: methods it calls on `self` (dotted: `vllm_generation.generate`), which our overrides rely on being reached;
- `sets`: attributes it assigns on `self`, which our code reads afterwards;
- `call_keywords`: the keyword arguments it passes to a named callee (TRL's `VLLMGeneration(...)` call, which
  `vllm_shared.make_generation` mirrors; an empty tuple for a call made with positional arguments only, such as
  `add_fused_lm_head`'s `load_balancing_loss_func(...)`);
- `source_sha256`: the source hash per release of the owning library it was reviewed on.

A missing hook or a changed structure raises `TRLContractError` before any model is loaded. A changed source with
the same structure (or a release with no pinned hash) is logged as a warning naming the hooks to review: the
overrides call `super()` and will most likely still work, but nobody has read that code yet.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import logging
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version

logger = logging.getLogger(__name__)

GRPO_TRAINER = "trl.trainer.grpo_trainer:GRPOTrainer"
TRAINER = "transformers.trainer:Trainer"
VLLM_GENERATION = "trl.generation.vllm_generation:VLLMGeneration"
TRL_UTILS = "trl.trainer.utils"
MIXTRAL = "transformers.models.mixtral.modeling_mixtral"


class TRLContractError(RuntimeError):
    """The installed TRL or transformers lacks a hook the trainer relies on, or the hook's structure changed."""


@dataclass(frozen=True)
class Hook:
    """One method or module-level function of TRL or transformers that `trl_longctx` overrides, calls, mirrors or
    relies on being called.

    Attributes:
        owner: `"module:Class"` the method is looked up on (through the class's MRO, as a call would), or `"module"`
            for a module-level function.
        name: The method's or function's name.
        use: `"override"` (our subclass replaces it and calls `super()`), `"call"` (our code calls it), `"reached"`
            (TRL must call it for our override of something else to run) or `"mirrored"` (our code computes what it
            computes, on another path).
        parameters: Its parameter names, in order (`self` included); what we pass or accept.
        reason: Why `trl_longctx` relies on it, in one line.
        upstream: The file it lives in, with the release it was reviewed on.
        on_change: What to review when it changes.
        source_sha256: Source hash of the method per release of the owning library (its base version).
        calls: Methods it must call on `self`, dotted for attributes (`"vllm_generation.generate"`).
        sets: Attributes it must assign on `self`.
        call_keywords: `{callee name: keyword names}` of calls it must make with exactly those keywords.
    """

    owner: str
    name: str
    use: str
    parameters: tuple[str, ...]
    reason: str
    upstream: str
    on_change: str
    source_sha256: Mapping[str, str] = field(default_factory=dict)
    calls: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    call_keywords: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """`module.Class.name`, for messages."""
        return f"{self.owner.replace(':', '.')}.{self.name}"

    @property
    def package(self) -> str:
        """The distribution whose release keys `source_sha256` (`trl`, `transformers`)."""
        return self.owner.split(".", 1)[0]

    def resolve(self):
        """The method (looked up through the MRO) or function as the installed library has it; `TRLContractError` if
        absent."""
        module_name, _, class_name = self.owner.partition(":")
        owner = importlib.import_module(module_name)
        if class_name:
            owner = getattr(owner, class_name)
        method = getattr(owner, self.name, None)
        if not callable(method):
            raise TRLContractError(
                f"{self.target} does not exist in {self.package} {installed_version(self.package)}; trl_longctx "
                f"relies on it: {self.reason}. {self.on_change}"
            )
        return method


def installed_version(package: str) -> str:
    """The installed base version of `package` (`"1.16.0"` for `"1.16.0+local"`)."""
    return version(package).split("+", 1)[0]


def source_sha256(method) -> str:
    """SHA-256 of the dedented source of `method`: pinned per release to notice upstream changes."""
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(method)))
    return hashlib.sha256(source.encode()).hexdigest()


def _dotted(node: ast.AST) -> str | None:
    """`"a.b"` for the expression `self.a.b`; `None` for anything not rooted at `self`."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self" and parts:
        return ".".join(reversed(parts))
    return None


@dataclass(frozen=True)
class Structure:
    """What a method's source does, read from its syntax tree: the fields `Hook.calls/sets/call_keywords` check."""

    parameters: tuple[str, ...]
    calls: frozenset[str]
    sets: frozenset[str]
    call_keywords: Mapping[str, frozenset[str]]

    @classmethod
    def of(cls, method) -> Structure:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(method))))
        calls, sets, keywords = set(), set(), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                if (name := _dotted(node.func)) is not None:
                    calls.add(name)
                callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if callee is not None:
                    keywords.setdefault(callee, set()).update(k.arg for k in node.keywords if k.arg is not None)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []  # fmt: skip
            for target in targets:
                for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                    value = getattr(element, "value", None)
                    if isinstance(element, ast.Attribute) and isinstance(value, ast.Name) and value.id == "self":
                        sets.add(element.attr)
        parameters = tuple(inspect.signature(method).parameters)
        frozen = {name: frozenset(words) for name, words in keywords.items()}
        return cls(parameters, frozenset(calls), frozenset(sets), frozen)


def structural_problems(hook: Hook, method) -> list[str]:
    """What in `method` breaks `hook` (empty when it holds), one sentence each."""
    found = Structure.of(method)
    problems = []
    if found.parameters != hook.parameters:
        problems.append(f"its parameters are {found.parameters}, trl_longctx was written for {hook.parameters}")
    if missing := [name for name in hook.calls if name not in found.calls]:
        problems.append(f"it no longer calls self.{', self.'.join(missing)}")
    if missing := [name for name in hook.sets if name not in found.sets]:
        problems.append(f"it no longer sets self.{', self.'.join(missing)}")
    for callee, words in hook.call_keywords.items():
        if callee not in found.call_keywords:
            problems.append(f"it no longer calls {callee}(...)")
        elif (got := found.call_keywords[callee]) != set(words):
            added, removed = sorted(got - set(words)), sorted(set(words) - got)
            problems.append(f"its {callee}(...) call changed keywords (added {added}, removed {removed})")
    return problems


def check_trl_contract(hooks: Sequence[Hook] | None = None) -> list[str]:
    """Verify the installed TRL and transformers against `hooks` (default: `TRL_HOOKS`).

    Returns:
        The hooks whose source is not the one reviewed for this release (logged once as a warning).

    Raises:
        TRLContractError: A hook is missing, or its parameters, calls, assignments or call keywords changed. The
            message names each hook, what changed, why `trl_longctx` relies on it and what to review.
    """
    if hooks is not None:
        return list(_check(hooks))
    # Once per process for the built-in hooks (every trainer built checks them; the answer cannot change).
    if _CHECKED.get("hooks") is not TRL_HOOKS:
        _CHECKED.update(hooks=TRL_HOOKS, unreviewed=_check(TRL_HOOKS))
    return list(_CHECKED["unreviewed"])


_CHECKED: dict[str, object] = {}


def _check(hooks: Sequence[Hook]) -> tuple[str, ...]:
    errors, unreviewed = [], []
    for hook in hooks:
        method = hook.resolve()
        if problems := structural_problems(hook, method):
            errors.append(f"{hook.target}: {'; '.join(problems)}. Relied on because {hook.reason}. {hook.on_change}")
            continue
        release = installed_version(hook.package)
        if hook.source_sha256.get(release) != source_sha256(method):
            unreviewed.append(hook.target)
    if errors:
        versions = f"trl {installed_version('trl')}, transformers {installed_version('transformers')}"
        raise TRLContractError(
            f"LongContextGRPOTrainer cannot run on {versions}: " + " | ".join(errors) + " Install the TRL release "
            "trl_longctx supports (trl_longctx._versions.SUPPORTED), or report the change."
        )
    if unreviewed:
        logger.warning(
            "trl_longctx was reviewed against other sources of %s (installed: trl %s, transformers %s); their "
            "structure is as expected, so training goes on. Compare them with the hooks in trl_longctx.trl_contract.",
            ", ".join(unreviewed), installed_version("trl"), installed_version("transformers"),
        )  # fmt: skip
    return tuple(unreviewed)


# The hooks, reviewed on trl 1.16.0 and transformers 5.17.0. Source hashes: `source_sha256(hook.resolve())`.
TRL_HOOKS: tuple[Hook, ...] = (
    Hook(
        GRPO_TRAINER, "__init__", "override",
        ("self", "model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
         "reward_processing_classes", "callbacks", "optimizers", "quantization_config", "peft_config", "tools",
         "rollout_func", "environment_factory"),
        reason="the trainer passes its arguments through and then reads what TRL's __init__ set: the sampling "
        "settings for its own VLLMGeneration, the metrics store the OOM retry and fault callbacks edit, and the "
        "rollout engine it replaces with the shared-weights one",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Review LongContextGRPOTrainer.__init__ and vllm_shared.make_generation.",
        source_sha256={"1.16.0": "08b825a073b699ff6fef17b85eda21fed2396007f2be8f30d65d49364643ef3a"},
        sets=("use_vllm", "vllm_generation", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
              "max_completion_length", "_metrics", "_last_loaded_step", "reward_funcs", "reward_func_names"),
        call_keywords={"VLLMGeneration": (
            "model", "accelerator", "processing_class", "mode", "structured_outputs_regex", "server_base_url",
            "server_host", "server_port", "group_port", "server_timeout", "tensor_parallel_size",
            "gpu_memory_utilization", "max_model_length", "max_num_seqs", "enable_sleep_mode", "model_impl",
            "trust_remote_code", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
            "max_completion_length", "logprobs", "generation_kwargs",
        )},
    ),
    Hook(
        GRPO_TRAINER, "_get_per_token_logps_and_entropies", "override",
        ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
         "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
         "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"),
        reason="the fused log-prob pass replaces it, MoE router aux loss and Qwen-VL images included (sliced per "
        "mini batch as it slices them); other multimodal keywords are passed back to TRL's",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Review LongContextGRPOTrainer._get_per_token_logps_and_entropies and its (logps, entropies, "
        "aux loss) return; moe_aux mirrors how TRL's fused lm_head forward (trl.trainer.utils.add_fused_lm_head) "
        "computes the aux loss and how this method averages it over mini batches.",
        source_sha256={"1.16.0": "fecf708797b16e296612c7b1efdb99e00b34ef1ce0f40afb787fbf86b2d9eac8"},
    ),
    Hook(
        TRL_UTILS, "split_pixel_values_by_grid", "call",
        ("batch",),
        reason="vision_language.ImageInputs splits Qwen-VL image inputs per sequence with it (pixel_values rows by "
        "image_grid_thw and num_images), the rows TRL's _get_per_token_logps_and_entropies gives each mini batch",
        upstream="trl/trainer/utils.py (v1.16.0)",
        on_change="Check that it still splits as TRL's _get_per_token_logps_and_entropies slices "
        "(tests/test_vision_language.py::test_image_inputs_are_trls_slices); review vision_language.ImageInputs.",
        source_sha256={"1.16.0": "3aca66e33a7978d3803635d549b67dc7d270be6db196836c51e475a6f1fa7b0d"},
    ),
    Hook(
        TRL_UTILS, "unsplit_pixel_values_by_grid", "call",
        ("batch",),
        reason="vision_language.ImageInputs joins a mini batch's per-sequence image inputs with it",
        upstream="trl/trainer/utils.py (v1.16.0)",
        on_change="Review vision_language.ImageInputs.batch.",
        source_sha256={"1.16.0": "9d31b407fc5f4399a89a747438997d3eb8698c65bc27bad53ebb469dac124275"},
    ),
    Hook(
        TRL_UTILS, "add_fused_lm_head", "mirrored",
        ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
        reason="TRL's log-prob pass gets the MoE router aux loss from the fused forward it installs: "
        "load_balancing_loss_func(router logits, text config's num_experts and num_experts_per_tok, attention mask) "
        "per mini batch; moe_aux computes the same on our path",
        upstream="trl/trainer/utils.py (v1.16.0)",
        on_change="Compare its aux-loss block with moe_aux.router_aux_loss and RouterAuxLoss (the loss function, the "
        "expert counts, the mask, output_router_logits) and tests/test_moe_aux_loss.py.",
        source_sha256={"1.16.0": "422d009f04b66659982f9545a90d560bdcc27fde3268de203d0c5c6d1449d211"},
        call_keywords={"load_balancing_loss_func": ()},
    ),
    Hook(
        MIXTRAL, "load_balancing_loss_func", "call",
        ("gate_logits", "num_experts", "top_k", "attention_mask"),
        reason="moe_aux.RouterAuxLoss calls it positionally, as add_fused_lm_head does, with per-layer router logits "
        "[tokens, experts] and the [sequences, length] attention mask",
        upstream="transformers/models/mixtral/modeling_mixtral.py (v5.17.0)",
        on_change="Review moe_aux.RouterAuxLoss.__call__, and RouterAuxLossMean if the loss became additive over "
        "sequences.",
        source_sha256={"5.17.0": "f224b99e93782bfec972662dccd26eb81797c790c6744d309c30a356afd3e735"},
    ),
    Hook(
        GRPO_TRAINER, "_compute_loss", "reached",
        ("self", "model", "inputs"),
        reason="the training loss must get its log-probs from _get_per_token_logps_and_entropies, which we replace",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Check that the loss still takes its log-probs from the overridden method.",
        source_sha256={"1.16.0": "16c4f3917b9fd26418d16176fd0aeb02ae30f3a41708061a5f8aa5bb74e25b26"},
        calls=("_get_per_token_logps_and_entropies",),
    ),
    Hook(
        GRPO_TRAINER, "_generate_single_turn", "override",
        ("self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"),
        reason="the rollout is wrapped to restore and release vLLM's KV cache and merge the adapter around it",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Review LongContextGRPOTrainer._generate_single_turn.",
        source_sha256={"1.16.0": "932da26950bae32c41af929b5f080391effd81a48aa1bd622c7e1cdb55a4b90e"},
        calls=("vllm_generation.generate",),
    ),
    Hook(
        GRPO_TRAINER, "_generate", "override",
        ("self", "prompts"),
        reason="every rollout must go through _generate_single_turn, which we wrap; what it returns starts with the "
        "prompt and completion ids, whose lengths size the host buffers reserved after the rollout",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Check that rollouts still reach _generate_single_turn and review LongContextGRPOTrainer._generate "
        "(the tuple it reads).",
        source_sha256={"1.16.0": "bea6bc4f3207f3960b3415b266a951128b47b6b7bf198207800ae13267020549"},
        calls=("_generate_single_turn",),
    ),
    Hook(
        GRPO_TRAINER, "_tokenize_prompts", "override",
        ("self", "prompts"),
        reason="prompts too long for the model's context are refused after TRL tokenizes them (first item: ids)",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Review LongContextGRPOTrainer._tokenize_prompts and the tuple it unpacks.",
        source_sha256={"1.16.0": "1056d2a0a7b475a0c70a1098e4846e58a76691c8604e5153e05024baa41396e0"},
    ),
    Hook(
        GRPO_TRAINER, "_prepare_inputs", "override",
        ("self", "generation_batch"),
        reason="the OOM retry reuses the batch its failed try prepared (no second rollout)",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Review LongContextGRPOTrainer._prepare_inputs and oom_retry.StepAttempt.",
        source_sha256={"1.16.0": "40caff99c2cf12923aa71bd1d7491e2439187e56c7e9e2de4318c011ff35302f"},
    ),
    Hook(
        GRPO_TRAINER, "training_step", "override",
        ("self", "model", "inputs", "num_items_in_batch"),
        reason="the OOM retry runs TRL's step again with lower sizes, and adds the failed try's time to the step time "
        "TRL accumulates in _current_train_step_time",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Review LongContextGRPOTrainer.training_step and oom_retry.",
        source_sha256={"1.16.0": "15ea836c392b6976d236a7333743c143f81cea132e09ef60a08f3a54cdfe61d0"},
        sets=("_current_train_step_time",),
    ),
    Hook(
        GRPO_TRAINER, "compute_loss", "override",
        ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
        reason="a NaN or Inf loss is refused or the step skipped, and the skip recorded in _metrics",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Review LongContextGRPOTrainer.compute_loss.",
        source_sha256={"1.16.0": "adf7308e034ac6c46b42bb6808bc89b5496af951843bc803b33aa032b93f9f0b"},
        calls=("_compute_loss",),
    ),
    Hook(
        GRPO_TRAINER, "_save_checkpoint", "override",
        ("self", "model", "trial"),
        reason="checkpoints are written under a staging name and published complete (checkpoints.atomic_checkpoint "
        "redirects _get_output_dir)",
        upstream="trl/trainer/grpo_trainer.py (v1.16.0)",
        on_change="Review checkpoints.atomic_checkpoint.",
        source_sha256={"1.16.0": "10fa449292ba1d3d01bd37b11a87d0092d4f2a42ef8baf3aa9277003e4e085ce"},
        calls=("_get_output_dir",),
    ),
    Hook(
        TRAINER, "_save_checkpoint", "reached",
        ("self", "model", "trial"),
        reason="every file of a checkpoint must go under _get_output_dir, and the Hub push through "
        "_push_from_checkpoint, which atomic_checkpoint redirects for the save",
        upstream="transformers/trainer.py (v5.17.0)",
        on_change="Review checkpoints.atomic_checkpoint.",
        source_sha256={"5.17.0": "4638fc7aeef978e1b9e6ed7c6ba9a120e1370a56bcea2e26cdaa597d2d41fc05"},
        calls=("_get_output_dir", "_push_from_checkpoint"),
    ),
    Hook(
        TRAINER, "_move_model_to_device", "override",
        ("self", "model", "device"),
        reason="weights shared with vLLM must not be moved (Module.to may copy them)",
        upstream="transformers/trainer.py (v5.17.0)",
        on_change="Review LongContextGRPOTrainer._move_model_to_device.",
        source_sha256={"5.17.0": "8d7d938e55952c686219956729eb516efd8d28415285fd3d73e8477a38f7d97c"},
    ),
    Hook(
        VLLM_GENERATION, "__init__", "override",
        ("self", "model", "accelerator", "processing_class", "mode", "structured_outputs_regex", "server_base_url",
         "server_host", "server_port", "server_timeout", "group_port", "tensor_parallel_size",
         "gpu_memory_utilization", "max_model_length", "max_num_seqs", "enable_sleep_mode", "model_impl",
         "trust_remote_code", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
         "max_completion_length", "logprobs", "generation_kwargs"),
        reason="vllm_shared.make_generation builds it for the shared engine (SharedWeightsVLLMGeneration.__init__ "
        "takes the engine and passes the rest on); SharedWeightsVLLMGeneration reads "
        "mode, tensor_parallel_size, enable_sleep_mode, accelerator and model and replaces _init_vllm",
        upstream="trl/generation/vllm_generation.py (v1.16.0)",
        on_change="Review vllm_shared.SharedWeightsVLLMGeneration and make_generation.",
        source_sha256={"1.16.0": "3496488e1f17dd8df0aa11dec70370bbec1251e7cc9fa8957338c679adb48de6"},
        calls=("_init_vllm",),
        sets=("mode", "tensor_parallel_size", "enable_sleep_mode", "accelerator", "model"),
    ),
    Hook(
        VLLM_GENERATION, "_init_vllm", "override",
        ("self",),
        reason="the shared engine is attached instead of built; TRL's sets llm and _llm_weights_sleeping, ours too",
        upstream="trl/generation/vllm_generation.py (v1.16.0)",
        on_change="Review vllm_shared.SharedWeightsVLLMGeneration._init_vllm: set what TRL's sets for colocate.",
        source_sha256={"1.16.0": "9910080dcf75821f8d8b6377d2ca84f1b276e0f10326ce560075ef36f764f0ae"},
        sets=("llm", "_llm_weights_sleeping"),
    ),
    Hook(
        VLLM_GENERATION, "generate", "reached",
        ("self", "prompts", "images", "num_generations", "profiler"),
        reason="image_prompts: TRL's rollout hands its engine's generate expanded image-token runs with the images; "
        "the trainer wraps the engine's generate to collapse them to one token per image, as vLLM expands",
        upstream="trl/generation/vllm_generation.py (v1.16.0)",
        on_change="Review image_prompts.one_token_per_image: the prompts TRL builds for vLLM and how it calls it.",
        source_sha256={"1.16.0": "50190d860bb1870bd877f77bb060d1fe09645d60d2225d81e78030b2ec824e64"},
        calls=("llm.generate",),
    ),
    Hook(
        VLLM_GENERATION, "sync_weights", "override",
        ("self",),
        reason="shared weights need no sync; the adapter goes to vLLM as an in-memory LoRA request",
        upstream="trl/generation/vllm_generation.py (v1.16.0)",
        on_change="Review vllm_shared.SharedWeightsVLLMGeneration.sync_weights.",
        source_sha256={"1.16.0": "657ae37767d95d4482469a5df4656070666a1d4a1c253d5ddcae74f5a0546253"},
    ),
)  # fmt: skip
