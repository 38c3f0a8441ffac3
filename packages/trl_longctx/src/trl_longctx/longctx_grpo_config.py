"""Configuration of `LongContextGRPOTrainer`: TRL's `GRPOConfig` plus the long-context fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from .config_checks import (
    COMPILE_DECODER_SETTINGS,
    CONFIG_RULES,
    LOGPROB_BACKENDS,
    LOSS_TYPES,
    VLLM_KV_CACHE_SIZINGS,
    check_combinations,
    check_fields,
    check_paths,
)
from .fault_callbacks import MAX_CONSECUTIVE_NONFINITE

__all__ = [
    "COMPILE_DECODER_SETTINGS",
    "LOGPROB_BACKENDS",
    "LOSS_TYPES",
    "VLLM_KV_CACHE_SIZINGS",
    "LongContextGRPOConfig",
]


@dataclass
class LongContextGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`LongContextGRPOTrainer`]. Only the parameters specific to long-context training are
    listed here; see [`~trl.GRPOConfig`] for the rest.

    Parameters:
        grpo_mini_batch (`int` or `None`, *optional*, defaults to `None`):
            Number of sequences run through the decoder at once when computing per-token log-probabilities. `None`
            uses the batch size TRL passes (the per-device batch size), on CUDA capped by the memory planner
            (`trl_longctx.memory.auto_chunk_sizes`) to what fits in the free memory.
        logit_chunk_multiplier (`int` or `None`, *optional*, defaults to `None`):
            Number of chunks each completion is split into for the torch backend's fused lm_head + log-softmax: one
            chunk of float32 logits holds `mini_batch * ceil(completion_length / logit_chunk_multiplier)` rows of the
            flattened `[mini_batch * completion_length]` tokens. `None` picks the chunk from a 256 MiB budget of
            float32 logits (`longctx_kernels.default_chunk_size`), or the memory planner's on CUDA. The Triton backend
            works in fixed tiles of its own and refuses a value here.
        logprob_backend (`str`, *optional*, defaults to `"auto"`):
            Backend of `longctx_kernels.selective_logprobs`: `"auto"` (Triton on CUDA, torch elsewhere), `"torch"` or
            `"triton"`.
        vllm_kv_standby (`bool` or `None`, *optional*, defaults to `None`):
            In colocate mode, release vLLM's KV cache after each rollout and restore it before the next, so the
            memory is the trainer's while it trains; the weights stay. `None` turns it on wherever the installed vLLM
            allows it (`trl_longctx.rollout_plan`; the log says which mechanism runs, and why when it is off).
        vllm_shared_weights (`bool` or `None`, *optional*, defaults to `None`):
            In colocate mode with a LoRA `peft_config` and the model given as a path, build vLLM first and make the
            trainer's frozen base weights views of vLLM's tensors (one copy in memory); each update reaches vLLM as
            an in-memory adapter under a fresh id instead of merged weights. Full fine-tuning refuses it. With a
            4-bit NF4 `quantization_config` (QLoRA), vLLM quantizes the checkpoint itself (`quantization=
            "bitsandbytes"`, a vLLM with bitsandbytes) and the trainer's layers are bitsandbytes `Linear4bit` views of
            its shards; the adapter then always reaches vLLM as a LoRA request. `None` turns it on for LoRA and QLoRA
            runs where KV standby (and, for QLoRA, vLLM's bitsandbytes) is available. TRL's
            `vllm_enable_sleep_mode=True` is honoured by sharing (no second copy of the weights to offload) plus KV
            standby; `vllm_shared_weights=False, vllm_kv_standby=False` keeps TRL's own engine and sleep mode.
        vllm_kv_cache_sizing (`str`, *optional*, defaults to `"rollout"`):
            How big the shared-weights engine's KV cache is (`vllm_shared_weights`). `"rollout"`: what one rollout
            can use at once, `max_num_seqs x vllm_max_model_length` tokens, passed to vLLM as
            `kv_cache_memory_bytes`, when `vllm_max_model_length` is set and that is below what
            `vllm_gpu_memory_utilization` would give; a larger cache is never used by a rollout, and mapping it back
            before each rollout costs time (`trl_longctx.memory.rollout_kv`). `"utilization"` (and `"rollout"`
            without `vllm_max_model_length`): vLLM's own sizing, all of `vllm_gpu_memory_utilization`. On vLLM's
            CPU build `VLLM_CPU_KVCACHE_SPACE`, when set, wins over both.
        vllm_prefix_caching (`bool`, *optional*, defaults to `False`):
            vLLM's automatic prefix caching in the shared-weights engine (`vllm_shared_weights`). In a GRPO rollout
            it saves only the prefill of the prompt's other `num_generations - 1` copies (completions are never
            reused), and costs hashing every completed KV block at each decode step: on an H200, a 2-sequence decode
            step took 2.31 ms without it and 2.45 ms with it (`tools/bench/decode_loop.py`, docs/benchmarks.md).
            Turn it on for long prompts with many generations and short completions. TRL's own engine (without
            shared weights) keeps vLLM's default (on).
        use_vllm_when_available (`bool`, *optional*, defaults to `False`):
            Generate with vLLM when it is installed and with transformers' `generate` otherwise, overriding
            `use_vllm`. The log says which one runs.
        skip_nonfinite_steps (`bool`, *optional*, defaults to `False`):
            On a NaN or Inf loss, skip the step (zero gradient, a warning, the `nonfinite_skipped` metric) instead of
            raising `trl_longctx.guards.NonFiniteError`; a non-finite reward then marks its completion unscorable.
        max_consecutive_nonfinite (`int`, *optional*, defaults to `3`):
            With `skip_nonfinite_steps`, this many skipped steps in a row stop the run with an error naming them
            (`trl_longctx.fault_callbacks`); a NaN or Inf weight after an update stops it at once either way.
        offload_checkpoints (`bool` or `None`, *optional*, defaults to `None`):
            Hold each decoder layer's checkpointed input in pinned host memory between forward and backward
            (`trl_longctx.memory.CheckpointOffloader`), the last layer's excepted. Needs `gradient_checkpointing`.
            `None` turns it on when training on CUDA with gradient checkpointing.
        tiled_mlp_chunks (`int` or `None`, *optional*, defaults to `None`):
            Run each decoder MLP (gate/up/down) over this many tiles of the mini-batch's `B * T` tokens, each tile
            recomputed in its own backward, so the backward holds one tile's `[tile, intermediate_size]` tensors
            instead of `[B * T, intermediate_size]` ones (`trl_longctx.memory.tile_mlps`); costs about one more MLP
            forward per layer. `1` turns it off. `None`: on CUDA the memory planner tiles only when the untiled
            step does not fit in the free memory even one sequence per decoder pass, with the fewest tiles that fit
            (tiles of at least 8,192 tokens); elsewhere untiled.
        retry_on_oom (`bool`, *optional*, defaults to `True`):
            When a training step runs out of memory, undo it (its partial gradients and metrics), halve what its
            log-prob pass ran with (mini batch and logit chunk; more MLP tiles at one sequence) for the rest of the run
            (`trl_longctx.logprob_pass`; the config is not changed), log the old and new sizes and retry the step
            once; a second failure raises `trl_longctx.oom_retry.OutOfMemoryRetryError` naming the step and the sizes
            tried. Single-process runs only (elsewhere the error is raised as it is).
        vllm_merge_adapter (`bool` or `None`, *optional*, defaults to `None`):
            With `vllm_shared_weights`, merge the LoRA adapter into the shared base weights for each rollout and copy
            the base weights back afterwards from a host copy (exact), so vLLM decodes plain weights instead of
            running LoRA kernels; `False` hands vLLM the adapter as an in-memory LoRA request. `None`: `True` on
            CUDA (a GRPO step measured 11.2 s merged against 15.9 s with vLLM's LoRA kernels on an H200), `False` on
            vLLM's CPU build.
        compile_decoder_layers (`str` or `None`, *optional*, defaults to `None`):
            `torch.compile` the decoder of the training path, applied once before the first step
            (`trl_longctx.compile_regions.compile_decoder_layers`): `"layers"` compiles each decoder layer (one graph
            shared by all layers; automatic dynamic shapes after the first new length), `"layers-dynamic"` with
            `dynamic=True`, `"layers-mark-dynamic"` with the sequence dimension marked dynamic from the first step,
            `"layers-max-autotune-no-cudagraphs"` with that inductor mode, `"model"` the whole decoder under one
            `torch.compile`. Checkpoint offloading stays eager around each compiled layer; tiled MLPs run eager
            inside it. Forwards with a KV cache (transformers' `generate`) stay eager. `None`, `"off"` or `"eager"`:
            not compiled.
    """

    grpo_mini_batch: int | None = field(
        default=None,
        metadata={
            "help": "Number of sequences run through the decoder at once when computing per-token log-probs. "
            "None uses the per-device batch size."
        },
    )
    logit_chunk_multiplier: int | None = field(
        default=None,
        metadata={
            "help": "Number of chunks each completion is split into for the fused lm_head + log-softmax. None picks "
            "the chunk from a 256 MiB budget of float32 logits."
        },
    )
    logprob_backend: str = field(
        default="auto",
        metadata={"help": "Backend of the fused log-prob kernel.", "choices": list(LOGPROB_BACKENDS)},
    )
    vllm_kv_standby: bool | None = field(
        default=None,
        metadata={
            "help": "Release vLLM's KV cache between rollouts in colocate mode (weights stay). None: on wherever the "
            "installed vLLM allows it (the log says why when it is off)."
        },
    )
    vllm_shared_weights: bool | None = field(
        default=None,
        metadata={
            "help": "In colocate mode with LoRA, make the trainer's frozen base weights views of vLLM's tensors and "
            "hand the adapter to vLLM in memory. None: on with LoRA where KV standby is available (also with TRL's "
            "vllm_enable_sleep_mode=True, whose intent it honours)."
        },
    )
    vllm_kv_cache_sizing: str = field(
        default="rollout",
        metadata={
            "help": "KV cache of the shared-weights vLLM engine: 'rollout' sizes it to max_num_seqs x "
            "vllm_max_model_length (when set; capped by vllm_gpu_memory_utilization); 'utilization' lets vLLM take "
            "all of it.",
            "choices": list(VLLM_KV_CACHE_SIZINGS),
        },
    )
    vllm_prefix_caching: bool = field(
        default=False,
        metadata={
            "help": "vLLM's prefix caching in the shared-weights engine: it saves only the prefill of a prompt's "
            "other generations and costs block hashing at every decode step."
        },
    )
    use_vllm_when_available: bool = field(
        default=False,
        metadata={
            "help": "Generate with vLLM when it is installed, with transformers' generate otherwise (overrides "
            "use_vllm)."
        },
    )
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={
            "help": "Skip a step whose loss is NaN/Inf (and treat non-finite rewards as unscorable) instead of "
            "raising an error naming the step and the tensor."
        },
    )
    max_consecutive_nonfinite: int = field(
        default=MAX_CONSECUTIVE_NONFINITE,
        metadata={
            "help": "With skip_nonfinite_steps, skipped steps in a row that stop the run (a NaN/Inf weight after an "
            "update stops it at once)."
        },
    )

    offload_checkpoints: bool | None = field(
        default=None,
        metadata={
            "help": "Hold checkpointed decoder-layer inputs in pinned host memory during the step. None: on with "
            "CUDA and gradient checkpointing."
        },
    )
    tiled_mlp_chunks: int | None = field(
        default=None,
        metadata={
            "help": "Tiles of the B*T tokens each decoder MLP runs over, recomputed per tile in the backward (1: off). "
            "None: on CUDA the fewest tiles the memory planner needs to fit the step (none when it fits untiled)."
        },
    )
    retry_on_oom: bool = field(
        default=True,
        metadata={
            "help": "On out of memory in a training step, halve what its log-prob pass ran with (mini batch, logit "
            "chunk) for the rest of the run and retry the step once (single-process runs)."
        },
    )

    vllm_merge_adapter: bool | None = field(
        default=None,
        metadata={
            "help": "With shared vLLM weights, merge the adapter into them for each rollout and restore them exactly "
            "afterwards (vLLM decodes without LoRA kernels). None: on with CUDA, off on vLLM's CPU build."
        },
    )
    compile_decoder_layers: str | None = field(
        default=None,
        metadata={
            "help": "torch.compile setting of the training path's decoder (trl_longctx.compile_regions): 'layers' "
            "compiles each decoder layer. None or 'off': eager.",
            "choices": list(COMPILE_DECODER_SETTINGS),
        },
    )

    def __post_init__(self):
        # Every range, type and choice first: TRL's own `__post_init__` does arithmetic on the batch fields (a zero
        # divides, a list raises a bare TypeError), and nothing may be loaded or written for a value refused here.
        check_fields(self, CONFIG_RULES)
        check_paths(self)
        if self.use_vllm_when_available:
            from trl.import_utils import is_vllm_available

            self.use_vllm = is_vllm_available()
        super().__post_init__()
        check_combinations(self)
