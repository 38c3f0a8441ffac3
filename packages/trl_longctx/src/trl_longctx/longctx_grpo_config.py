"""Configuration of `LongContextGRPOTrainer`: TRL's `GRPOConfig` plus the long-context fields.

Each field is described once, by its `metadata["help"]` (what `HfArgumentParser`'s `--help` shows). The class
docstring's parameter list is built from those texts when this module is imported, under the headings of
`FIELD_GROUPS` as TRL's `GRPOConfig` groups its own ("> Parameters that control ..."); the README's field table is
`fields_markdown()`, written into it by the repository's generator script (a test fails when the two drift).
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field

from trl import GRPOConfig

from .config_checks import (
    COMPILE_DECODER_SETTINGS,
    CONFIG_RULES,
    LOGPROB_BACKENDS,
    LOSS_TYPES,
    TRAINING_LAYOUTS,
    VLLM_FP8_MATMULS,
    VLLM_FP8_WEIGHTS,
    VLLM_KV_CACHE_SIZINGS,
    check_combinations,
    check_fields,
    check_paths,
)
from .fault_callbacks import MAX_CONSECUTIVE_NONFINITE

__all__ = [
    "COMPILE_DECODER_SETTINGS",
    "FIELD_GROUPS",
    "LOGPROB_BACKENDS",
    "LOSS_TYPES",
    "TRAINING_LAYOUTS",
    "VLLM_FP8_MATMULS",
    "VLLM_FP8_WEIGHTS",
    "VLLM_KV_CACHE_SIZINGS",
    "LongContextGRPOConfig",
    "fields_docstring",
    "fields_markdown",
    "grouped_fields",
]

# The headings of our fields ("Parameters that control <heading>"), each with its fields, in the class body's order.
# Building the docstring checks that they name every field of `LongContextGRPOConfig` not in `GRPOConfig` once, in
# that order.
FIELD_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the log-prob pass", ("grpo_mini_batch", "logit_chunk_multiplier", "logprob_backend", "training_layout")),
    ("memory", ("offload_checkpoints", "tiled_mlp_chunks", "flex_attention", "sequence_parallel_size")),
    ("compilation of the training path", ("compile_decoder_layers", "warm_up_kernels")),
    ("generation with vLLM", ("use_vllm_when_available",)),
    (
        'colocated vLLM execution (only used when `vllm_mode` is `"colocate"`)',
        (
            "vllm_kv_standby",
            "vllm_shared_weights",
            "vllm_fp8_weights",
            "vllm_fp8_matmul",
            "vllm_merge_adapter",
            "vllm_kv_cache_sizing",
            "vllm_prefix_caching",
        ),
    ),
    ("fault handling", ("skip_nonfinite_steps", "max_consecutive_nonfinite", "retry_on_oom")),
)

_INTRO = """
    Configuration class for [`LongContextGRPOTrainer`]. Only the parameters specific to long-context training are
    listed here; see [`~trl.GRPOConfig`] for the rest.

    Using [`~transformers.HfArgumentParser`] (or TRL's `TrlParser`, as `longctx-grpo train` does) this class becomes
    command-line arguments; `--help` shows the same texts.
"""


@dataclass
class LongContextGRPOConfig(GRPOConfig):
    """Configuration class for [`LongContextGRPOTrainer`]; its parameter list is built from the fields' help."""

    # Parameters that control the log-prob pass
    grpo_mini_batch: int | None = field(
        default=None,
        metadata={
            "help": "Number of sequences run through the decoder at once when computing per-token log-probabilities. "
            "`None` uses the batch size TRL passes (the per-device batch size), on CUDA capped by the memory planner "
            "(`trl_longctx.memory.planner.auto_chunk_sizes`) to what fits in the free memory."
        },
    )
    logit_chunk_multiplier: int | None = field(
        default=None,
        metadata={
            "help": "Number of chunks each completion is split into for the torch backend's fused lm_head + "
            "log-softmax: one chunk of float32 logits holds `mini_batch * ceil(completion_length / "
            "logit_chunk_multiplier)` rows of the flattened `[mini_batch * completion_length]` tokens. `None` picks "
            "the chunk from a 256 MiB budget of float32 logits (`longctx_kernels.default_chunk_size`), or the memory "
            "planner's on CUDA. The Triton backend works in fixed tiles of its own and refuses a value here."
        },
    )
    logprob_backend: str = field(
        default="auto",
        metadata={
            "help": 'Backend of `longctx_kernels.selective_logprobs`: `"auto"` (Triton on CUDA, torch elsewhere), '
            '`"torch"` or `"triton"`.',
            "choices": list(LOGPROB_BACKENDS),
        },
    )
    training_layout: str = field(
        default="padded",
        metadata={
            "help": "How the log-prob pass lays the sequences out for the decoder (`trl_longctx.training_layout`): "
            '`"padded"`, TRL\'s `[batch, longest prompt + longest completion]` with padding; `"packed"`, the real '
            "tokens of each mini batch side by side in one row, each sequence attending to itself only (no padded "
            'position computed); `"shared-prompt"`, packed with each prompt once per group of completions that '
            "share it (rows compared, not assumed), each completion attending to the prompt and itself, so the "
            "prompt's forward and backward run once per group. Both give the padded layout's log-probs, entropies "
            "and gradients up to rounding, and 0 where TRL's mask is 0; a batch they cannot take (for "
            '`"shared-prompt"`: no two rows with one prompt) runs padded, and the log says why once. On CUDA they '
            "run flex attention (`flex_attention=None` turns it on; `False` is refused: a dense mask grows with the "
            "square of the packed tokens); on CPU the model's own attention with a dense mask. Refused for "
            "vision-language models, sliding-window layers, the MoE router aux loss and flash attention kernels.",
            "choices": list(TRAINING_LAYOUTS),
        },
    )

    # Parameters that control memory
    offload_checkpoints: bool | None = field(
        default=None,
        metadata={
            "help": "Hold each decoder layer's checkpointed input in pinned host memory between forward and backward "
            "(`trl_longctx.memory.CheckpointOffloader`), the last layer's excepted. Needs `gradient_checkpointing`. "
            "`None` turns it on when training on CUDA with gradient checkpointing."
        },
    )
    tiled_mlp_chunks: int | None = field(
        default=None,
        metadata={
            "help": "Run each decoder MLP (gate/up/down) over this many tiles of the mini-batch's `B * T` tokens, "
            "each tile recomputed in its own backward, so the backward holds one tile's `[tile, intermediate_size]` "
            "tensors instead of `[B * T, intermediate_size]` ones (`trl_longctx.memory.tile_mlps`); costs about one "
            "more MLP forward per layer. In Mixture-of-Experts layers the experts are tiled (their `top_k` rows per "
            "token), the router is not. `1` turns it off. `None`: on CUDA the memory planner tiles only when the "
            "untiled step does not fit in the free memory even one sequence per decoder pass, with the fewest tiles "
            "that fit (tiles of at least 8,192 tokens); elsewhere untiled."
        },
    )
    flex_attention: bool | None = field(
        default=None,
        metadata={
            "help": "Run the decoder's attention as `trl_longctx.attention` (registered with transformers as "
            '`attn_implementation="longctx_flex"`): torch\'s flex attention, compiled, over a block mask (causal, '
            "sliding window, padding), with learned attention sinks (gpt-oss) folded in exactly through the "
            "log-sum-exp it returns; its memory grows linearly with the sequence. `None` turns it on when training "
            "on CUDA a model with attention sinks that runs `eager` attention (the only trainable one transformers "
            "gives it, whose `[batch, heads, T, T]` scores grow with the square of the sequence) or with a "
            '`training_layout` other than `"padded"` (its block masks), and keeps the model\'s own attention '
            "otherwise. `True` runs it for any model whose attention goes through transformers' `AttentionInterface` (sliding-window models too); CUDA only, as torch's flex attention "
            "has no backward on CPU. `False` keeps the model's own. The log says which attention runs and why."
        },
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Split each sequence of the log-prob passes (training, old and reference) across this many "
            "processes with DeepSpeed Ulysses (`trl_longctx.sequence_parallel`, extra `[deepspeed]`): consecutive "
            "ranks form groups of this size, each rank runs `1/size` of every row's tokens of its group (the "
            "attention all-to-all gives it all tokens for `heads/size` heads), so one sequence's activations and "
            "checkpoints are spread over the group. Every rank keeps its own GRPO rows and loss; DDP's average of "
            "the gradients is then exactly the unsplit run's. Must divide the number of processes and the "
            'attention heads. Refused with a `training_layout` other than `"padded"`, with `compile_decoder_layers`, '
            "FSDP or DeepSpeed (`fsdp`, `deepspeed`), and when the trainer is built for models with images, "
            "sliding-window layers, the MoE router aux loss, an adapter on the lm_head, `eager` or flex attention. "
            "`1` turns it off."
        },
    )

    # Parameters that control compilation of the training path
    compile_decoder_layers: str | None = field(
        default=None,
        metadata={
            "help": "`torch.compile` the decoder of the training path, applied once before the first step "
            '(`trl_longctx.compile_regions.compile_decoder_layers`): `"layers"` compiles each decoder layer (one '
            "graph shared by all layers; automatic dynamic shapes after the first new length), "
            '`"layers-dynamic"` with `dynamic=True`, `"layers-mark-dynamic"` with the sequence dimension marked '
            'dynamic from the first step, `"layers-max-autotune-no-cudagraphs"` with that inductor mode, `"model"` '
            "the whole decoder under one `torch.compile`. Checkpoint offloading stays eager around each compiled "
            "layer; tiled MLPs run eager inside it. Forwards with a KV cache (transformers' `generate`) stay eager. "
            "`None`: not compiled.",
            "choices": list(COMPILE_DECODER_SETTINGS),
        },
    )
    warm_up_kernels: bool = field(
        default=True,
        metadata={
            "help": "Compile the Triton kernels of the fused log-probs for the model's lm_head on a background thread "
            "once the trainer is built, while the first rollout runs (`longctx_kernels.warmup`), so that the first "
            "training step does not compile them (seconds per kernel where Triton's cache is empty); the first "
            "log-prob pass waits for what is left of it, and the log says how long each took. Only where the Triton "
            "backend runs (CUDA) on a plain lm_head weight; elsewhere the log says why not. `False`: the first step "
            "compiles them."
        },
    )

    # Parameters that control generation with vLLM
    use_vllm_when_available: bool = field(
        default=False,
        metadata={
            "help": "Generate with vLLM when it is installed and with transformers' `generate` otherwise (with "
            "`use_vllm=False`; `use_vllm=True` always asks for vLLM). Resolved by the trainer's rollout plan, not "
            "written into the config; the log says which one runs."
        },
    )

    # Parameters that control colocated vLLM execution
    vllm_kv_standby: bool | None = field(
        default=None,
        metadata={
            "help": "In colocate mode, release vLLM's KV cache after each rollout and restore it before the next, so "
            "the memory is the trainer's while it trains; the weights stay. `None` turns it on wherever the "
            "installed vLLM allows it (`trl_longctx.rollout_plan`; the log says which mechanism runs, and why when "
            "it is off)."
        },
    )
    vllm_shared_weights: bool | None = field(
        default=None,
        metadata={
            "help": "In colocate mode with a LoRA `peft_config` and the model given as a path, build vLLM first and "
            "make the trainer's frozen base weights views of vLLM's tensors (one copy in memory); each update "
            "reaches vLLM as an in-memory adapter under a fresh id instead of merged weights. Full fine-tuning "
            "refuses it. With a 4-bit NF4 `quantization_config` (QLoRA), vLLM quantizes the checkpoint itself "
            '(`quantization="bitsandbytes"`, a vLLM with bitsandbytes) and the trainer\'s layers are bitsandbytes '
            "`Linear4bit` views of its shards; the adapter then always reaches vLLM as a LoRA request. `None` turns "
            "it on for LoRA and QLoRA runs where KV standby (and, for QLoRA, vLLM's bitsandbytes) is available. "
            "TRL's `vllm_enable_sleep_mode=True` is honoured by sharing (no second copy of the weights to offload) "
            "plus KV standby; `vllm_shared_weights=False, vllm_kv_standby=False` keeps TRL's own engine and sleep "
            "mode."
        },
    )
    vllm_fp8_weights: str | None = field(
        default=None,
        metadata={
            "help": "FP8 base weights under a LoRA adapter, with `vllm_shared_weights`: vLLM quantizes the bf16/fp16 "
            "checkpoint to `float8_e4m3fn` while loading it (its online quantization, "
            '`quantization="fp8_per_channel"`, `"fp8_per_tensor"` or `"fp8_per_block"`), and the trainer\'s frozen '
            "base layers are views of those FP8 weights and their scales (`vllm_standby.Fp8Linear`: one copy, half "
            "the bytes of bf16); the adapter stays in 16/32 bits and reaches vLLM as an in-memory LoRA request. "
            '`"per-channel"`: a scale per output row; `"per-tensor"`: one per fused layer; `"per-block"`: one per '
            "128 x 128 block. The trainer's matmul on them is `vllm_fp8_matmul`'s. Needs a CUDA build of vLLM "
            "with online FP8 quantization and a GPU of compute capability >= 8.9 (Ada, Hopper or newer); refused "
            "elsewhere, saying what to use instead. FP8 sampling and bf16 training differ in their log-probs more "
            "than bf16 does: needs `vllm_importance_sampling_correction=True` (TRL's default), which corrects each "
            "step for it and logs the gap as `sampling/sampling_logp_difference`. `None`: the checkpoint's dtype.",
            "choices": list(VLLM_FP8_WEIGHTS),
        },
    )
    vllm_fp8_matmul: str = field(
        default="dequantize",
        metadata={
            "help": "The trainer's matmul on the FP8 base weights of `vllm_fp8_weights` (`vllm_standby.Fp8Linear`). "
            '`"dequantize"`: each weight dequantized to bf16 for its matmul, bf16 arithmetic (W8A16). '
            '`"scaled_mm"`: FP8 by FP8 through `torch._scaled_mm`, forward and input gradient (W8A8): activations '
            "quantized per token as vLLM's FP8 kernels quantize them, output gradients per row (times the weight's "
            "scales), each by one Triton kernel; closer to the sampler's numerics, further from the exact product "
            "(about 2^-4 relative per element); per-channel or per-tensor scales only.",
            "choices": list(VLLM_FP8_MATMULS),
        },
    )
    vllm_merge_adapter: bool | None = field(
        default=None,
        metadata={
            "help": "With `vllm_shared_weights`, merge the LoRA adapter into the shared base weights for each rollout "
            "and copy the base weights back afterwards from a host copy (exact), so vLLM decodes plain weights "
            "instead of running LoRA kernels; `False` hands vLLM the adapter as an in-memory LoRA request. `None`: "
            "`True` on CUDA, where vLLM's LoRA kernels decode slower than plain weights; `False` on vLLM's CPU build "
            "and with 4-bit (QLoRA) shared weights, which an adapter cannot be merged into (`True` is refused there). "
            "An adapter on parameters (`target_parameters`, e.g. fused MoE experts) is merged only (a LoRA request of "
            "it is refused)."
        },
    )
    vllm_kv_cache_sizing: str = field(
        default="rollout",
        metadata={
            "help": 'How big the shared-weights engine\'s KV cache is (`vllm_shared_weights`). `"rollout"`: what one '
            "rollout can use at once, `max_num_seqs x vllm_max_model_length` tokens, passed to vLLM as "
            "`kv_cache_memory_bytes`, when `vllm_max_model_length` is set and that is below what "
            "`vllm_gpu_memory_utilization` would give; a larger cache is never used by a rollout, and mapping it back "
            'before each rollout costs time (`trl_longctx.memory.rollout_kv`). `"utilization"` (and `"rollout"` '
            "without `vllm_max_model_length`): vLLM's own sizing, all of `vllm_gpu_memory_utilization`. On vLLM's "
            "CPU build `VLLM_CPU_KVCACHE_SPACE`, when set, wins over both.",
            "choices": list(VLLM_KV_CACHE_SIZINGS),
        },
    )
    vllm_prefix_caching: bool = field(
        default=False,
        metadata={
            "help": "vLLM's automatic prefix caching in the shared-weights engine (`vllm_shared_weights`). A GRPO "
            "rollout reuses only the prompt: caching saves the prefill of its other `num_generations - 1` copies "
            "(completions are never reused), while hashing each filled KV block costs a noticeable part of a short "
            "decode step. Turn it on for long prompts with many generations and short completions. TRL's own engine "
            "(without shared weights) keeps vLLM's default (on)."
        },
    )

    # Parameters that control fault handling
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={
            "help": "On a NaN or Inf loss, skip the step (zero gradient, a warning, the `nonfinite_skipped` metric) "
            "instead of raising `trl_longctx.guards.NonFiniteError`; a non-finite reward then marks its completion "
            "unscorable."
        },
    )
    max_consecutive_nonfinite: int = field(
        default=MAX_CONSECUTIVE_NONFINITE,
        metadata={
            "help": "With `skip_nonfinite_steps`, this many skipped steps in a row stop the run with an error naming "
            "them (`trl_longctx.fault_callbacks`); a NaN or Inf weight after an update stops it at once either way."
        },
    )
    retry_on_oom: bool = field(
        default=True,
        metadata={
            "help": "When a training step runs out of memory, undo it (its partial gradients and metrics), halve what "
            "its log-prob pass ran with (mini batch and logit chunk; more MLP tiles at one sequence) for the rest of "
            "the run (`trl_longctx.logprob_pass`; the config is not changed), log the old and new sizes and retry the "
            "step once; a second failure raises `trl_longctx.oom_retry.OutOfMemoryRetryError` naming the step and "
            "the sizes tried. Single-process runs only (elsewhere the error is raised as it is)."
        },
    )

    def __post_init__(self):
        # Every range, type and choice first: TRL's own `__post_init__` does arithmetic on the batch fields (a zero
        # divides, a list raises a bare TypeError), and nothing may be loaded or written for a value refused here.
        check_fields(self, CONFIG_RULES)
        check_paths(self)
        super().__post_init__()
        check_combinations(self)


def grouped_fields() -> list[tuple[str, list[dataclasses.Field]]]:
    """Our fields (those of `LongContextGRPOConfig` not in `GRPOConfig`) under their `FIELD_GROUPS` headings.

    Raises:
        RuntimeError: If `FIELD_GROUPS` does not list every one of our fields once, in the class body's order, or a
            field has no help text.
    """
    inherited = {f.name for f in dataclasses.fields(GRPOConfig)}
    ours = {f.name: f for f in dataclasses.fields(LongContextGRPOConfig) if f.name not in inherited}
    listed = [name for _, names in FIELD_GROUPS for name in names]
    if listed != list(ours):
        raise RuntimeError(
            f"FIELD_GROUPS must list the fields of LongContextGRPOConfig in the class body's order, {list(ours)}, "
            f"got {listed}."
        )
    missing = [name for name, f in ours.items() if not f.metadata.get("help")]
    if missing:
        raise RuntimeError(f"Fields of LongContextGRPOConfig need a metadata['help'] text: {missing}.")
    return [(heading, [ours[name] for name in names]) for heading, names in FIELD_GROUPS]


def _type_text(f: dataclasses.Field) -> str:
    """`"int | None"` -> "`int` or `None`" (TRL's docstring style)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return " or ".join(f"`{part.strip()}`" for part in annotation.split("|"))


def _default_text(value: object) -> str:
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def fields_docstring() -> str:
    """The class docstring: the introduction, then each group's heading and its fields' help, as TRL writes its own."""
    lines = [_INTRO.rstrip("\n"), "", "    Parameters:"]
    for heading, group in grouped_fields():
        lines += [f"        > Parameters that control {heading}", ""]
        for f in group:
            lines.append(f"        {f.name} ({_type_text(f)}, *optional*, defaults to {_default_text(f.default)}):")
            lines += textwrap.wrap(
                f.metadata["help"],
                width=119,
                initial_indent=" " * 12,
                subsequent_indent=" " * 12,
                break_long_words=False,
                break_on_hyphens=False,
            )
        lines.append("")
    return "\n".join(lines) + "    "


def fields_markdown() -> str:
    """The README's field table: a bold heading and a `| field | default | meaning |` table per group."""
    parts = []
    for heading, group in grouped_fields():
        rows = [f"**{heading[0].upper()}{heading[1:]}**", "", "| field | default | meaning |", "| --- | --- | --- |"]
        for f in group:
            meaning = f.metadata["help"].replace("|", "\\|")
            rows.append(f"| `{f.name}` | {_default_text(f.default)} | {meaning} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


LongContextGRPOConfig.__doc__ = fields_docstring()
