"""`LongContextGRPOTrainer`: TRL's `GRPOTrainer` with per-token log-probs that never materialize the logits."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from trl import GRPOTrainer

from longctx_kernels import selective_logprobs

from . import oom_retry
from .checkpoints import atomic_checkpoint
from .compile_regions import compile_decoder_layers
from .distributed import ForwardRedirection, full_tensor
from .guards import check_finite, check_prompt_lengths, check_train_dataset, guard_loss, guard_reward_functions
from .longctx_grpo_config import LongContextGRPOConfig
from .memory.offload_checkpoints import CheckpointOffloader, ReleaseBuffersCallback
from .memory.tiled_mlp import tile_mlps
from .model_heads import decoder_and_lm_head, logit_transform_from_config, plain_lm_head_weights

logger = logging.getLogger(__name__)

# Keyword arguments of `_get_per_token_logps_and_entropies` that only multimodal models pass; with any of them set,
# TRL's own path (which knows how to slice images per sequence) runs instead of ours.
_MULTIMODAL_KWARGS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class LongContextGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` whose per-token log-probs and entropies come from `longctx_kernels.selective_logprobs`.

    Only `_get_per_token_logps_and_entropies` is replaced, so every TRL loss type, importance-sampling mode, entropy
    mask and metric stays TRL's. The decoder runs on `grpo_mini_batch` sequences at a time; the lm_head and the
    log-softmax run in chunks of tokens and never hold `[tokens, vocab]` logits.

    Args:
        model, reward_funcs, **kwargs: As `trl.GRPOTrainer`.
        args: A `LongContextGRPOConfig` (`None` lets TRL build a default `GRPOConfig`-like one).

    Example:
        >>> trainer = LongContextGRPOTrainer(model="path/to/model", reward_funcs=my_reward, train_dataset=dataset,
        ...                                  args=LongContextGRPOConfig(output_dir="runs/x"))
        >>> trainer.train()
    """

    def __init__(self, model, reward_funcs, args: LongContextGRPOConfig | None = None, **kwargs):
        if args is not None and not isinstance(args, LongContextGRPOConfig):
            raise TypeError(f"args must be a LongContextGRPOConfig, got {type(args).__name__}.")
        check_train_dataset(kwargs.get("train_dataset"))
        shared_llm = None
        # On CUDA without shared weights, TRL's own sleep()/wake_up() calls do the KV-only standby (see below).
        kv_standby_by_trl = False
        if args is not None and args.use_vllm and args.vllm_mode == "colocate":
            # vLLM's CPU build repacks weights at load time; our patches keep them updatable in place. They must be
            # live before TRL builds the engine inside `super().__init__`.
            import vllm_standby

            vllm_standby.enable()
            init_kwargs = args.model_init_kwargs or {}
            quantization = kwargs.get("quantization_config") or init_kwargs.get("quantization_config")
            if _resolve_shared_weights(args, model, kwargs.get("peft_config"), quantization):
                model, shared_llm = _shared_model_and_engine(
                    model, args, kwargs["peft_config"], quantized=quantization is not None
                )
                # The model is built (vLLM quantized it in 4 bits when asked): TRL must not load or quantize another.
                kwargs.pop("quantization_config", None)
                # TRL must not build a second engine (a second copy of the weights): ours is attached below.
                args.use_vllm = False
            elif _uses_vllm_sleep_for_standby(args):
                # On CUDA the KV cache can only be released from vLLM's CuMem pool, which TRL's sleep mode turns on;
                # with vllm_standby enabled, TRL's own sleep()/wake_up() calls release and restore the KV cache only.
                args.vllm_enable_sleep_mode = True
                kv_standby_by_trl = True
        self._shares_vllm_weights = shared_llm is not None
        try:
            super().__init__(model, reward_funcs, args=args, **kwargs)
        finally:
            if shared_llm is not None:
                args.use_vllm = True
        if shared_llm is not None:
            from .vllm_shared import make_generation

            self.use_vllm = True
            self.vllm_generation = make_generation(self, shared_llm)
            self._last_loaded_step = -1
            # Accelerate's `prepare` would call `model.to(accelerator.device)`; on CPU that device can be `cpu:0`
            # while vLLM's tensors are on `cpu`, and `Tensor.to` then returns copies: the sharing would end silently.
            self.accelerator.device_placement = False
        self._adapter_merger = None
        if shared_llm is not None and self.vllm_generation.merge_adapter:
            from .merged_rollout import AdapterMerger

            self._adapter_merger = AdapterMerger(self.accelerator.unwrap_model(self.model))
        compile_setting = getattr(self.args, "compile_decoder_layers", None)
        if compile_setting not in (None, "off"):
            # Once, on the model our log-prob path runs (the PEFT model, not an accelerate wrapper); lazy: each
            # shape compiles at its first forward.
            compile_decoder_layers(self.accelerator.unwrap_model(self.model), compile_setting)
        # One offloader for the whole run: its pinned buffers are reused by every step and freed at train end.
        self.checkpoint_offloader = CheckpointOffloader()
        self.add_callback(ReleaseBuffersCallback(self.checkpoint_offloader))
        self._forward_redirection = ForwardRedirection()
        # `grpo_mini_batch=None` on CUDA: the planner's choice per (sequences, length, completion), made once.
        self._planned_mini_batches: dict[tuple[int, int, int], int] = {}
        guard_reward_functions(self)  # errors name the reward function and the step
        # A custom `rollout_func` may call vLLM outside `_generate_single_turn`, where the KV cache must be live.
        # Who releases and restores it: this trainer around each rollout, or TRL's sleep-mode calls (CUDA, no sharing).
        self._kv_standby_here = (
            not kv_standby_by_trl
            and self.use_vllm
            and self.vllm_mode == "colocate"
            and self.rollout_func is None
            and _resolve_kv_standby(args)
        )
        self._kv_standby = kv_standby_by_trl or self._kv_standby_here
        if self.use_vllm:
            import vllm

            logger.warning(
                "Rollouts: vLLM %s (%s mode, in-process, KV-cache standby %s, shared weights %s).",
                vllm.__version__,
                self.vllm_mode,
                "on" if self._kv_standby else "off",
                "on" if shared_llm is not None else "off",
            )
            if self._kv_standby_here:
                # The engine was built with its KV cache; training starts now, so release it until the first rollout.
                from vllm_standby import release_kv_cache

                release_kv_cache(self.vllm_generation.llm)
        else:
            logger.warning("Rollouts: transformers `generate` (vLLM not used).")

    def _move_model_to_device(self, model, device):
        """Transformers' placement, except for weights shared with vLLM: they stay vLLM's tensors, where vLLM put them.

        `Module.to` may return copies (on CPU, `cpu:0` vs `cpu`: seen once an earlier engine had set `LOCAL_RANK`),
        which would silently end the sharing: the trainer would train on copies while vLLM samples from the originals.
        """
        if self._shares_vllm_weights:
            return
        super()._move_model_to_device(model, device)

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, written under a temporary name and renamed to `checkpoint-N` once complete."""
        with atomic_checkpoint(self, trial):
            super()._save_checkpoint(model, trial)

    def _generate_single_turn(self, *args, **kwargs):
        """TRL's rollout, with vLLM's KV cache restored just before and released right after (colocate mode), and with
        shared weights in merged mode the adapter merged into them for its length.

        Raises:
            RuntimeError: If vLLM fails; the message names the training step, the original error is chained.
        """
        try:
            with contextlib.ExitStack() as rollout:
                if self._kv_standby_here:
                    from vllm_standby import release_kv_cache, restore_kv_cache

                    restore_kv_cache(self.vllm_generation.llm)
                    rollout.callback(release_kv_cache, self.vllm_generation.llm)
                if self._adapter_merger is not None:
                    # Shared weights: vLLM decodes the merged adapter; the base weights come back exactly after.
                    rollout.enter_context(self._adapter_merger.merged())
                return super()._generate_single_turn(*args, **kwargs)
        except Exception as error:
            if not self.use_vllm:
                raise
            step = self.state.global_step + 1
            raise RuntimeError(f"vLLM generation failed at step {step}: {type(error).__name__}: {error}") from error

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, refused (or the step skipped, with `skip_nonfinite_steps`) when it is NaN or Inf."""
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        skip, step = self.args.skip_nonfinite_steps, self.state.global_step + 1
        guarded = guard_loss(loss, model, step, skip=skip, accelerator=self.accelerator)
        if skip and self.model.training:
            self._metrics["train"]["nonfinite_skipped"].append(float(guarded is not loss))
        return guarded

    # The try of the training step under way, which `_prepare_inputs` tells about its batch (see `training_step`).
    _step_attempt: oom_retry.StepAttempt | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step; on running out of memory, lower the chunk sizes for the rest of the run and retry it once.

        With `retry_on_oom` in a single-process run, the failed try is undone first (`oom_retry.StepAttempt`: its
        gradients and metrics dropped, earlier micro-steps' gradients kept) and the retry reuses its prepared batch.

        Raises:
            oom_retry.OutOfMemoryRetryError: If the retry runs out of memory too, or there is nothing left to lower.
        """
        if not (self.args.retry_on_oom and oom_retry.retry_supported(self.accelerator)):
            return super().training_step(model, inputs, num_items_in_batch)
        run = functools.partial(super().training_step, model, inputs, num_items_in_batch)
        step, length = self.state.global_step + 1, self.args.max_completion_length
        vocab_size = decoder_and_lm_head(self.accelerator.unwrap_model(model))[1].weight.size(0)
        tried = [oom_retry.current_chunk_sizes(self.args, vocab_size)]
        first = oom_retry.StepAttempt(self, model)
        try:
            with first:
                return run()
        except Exception as error:
            if not oom_retry.is_out_of_memory(error):
                raise
            summary = oom_retry.first_line(error)
        # Out of the `except` block the error and its traceback, which held the failed try's tensors, are gone.
        oom_retry.free_memory(self.accelerator.device)
        lowered = oom_retry.lowered_chunk_sizes(tried[0], length, vocab_size)
        if lowered is None:
            raise oom_retry.OutOfMemoryRetryError(oom_retry.failure_message(step, summary, tried))
        logger.warning(oom_retry.lowering_message(step, summary, tried[0], lowered, length))
        oom_retry.apply_chunk_sizes(self.args, lowered)
        tried.append(lowered)
        try:
            with oom_retry.StepAttempt(self, model, batch=first.batch):
                return run()
        except Exception as error:
            if not oom_retry.is_out_of_memory(error):
                raise
            raise oom_retry.OutOfMemoryRetryError(
                oom_retry.failure_message(step, oom_retry.first_line(error), tried)
            ) from error

    def _prepare_inputs(self, generation_batch):
        """TRL's batch preparation; the retry of a step that ran out of memory reuses the batch of its first try."""
        attempt = self._step_attempt
        if attempt is not None and attempt.batch is not None:
            return attempt.batch
        batch = super()._prepare_inputs(generation_batch)
        if attempt is not None:
            attempt.prepared(batch)
        return batch

    def _tokenize_prompts(self, prompts: list):
        """TRL's tokenization, refusing prompts that leave no room for the completion in the model's context."""
        prompt_ids, *rest = super()._tokenize_prompts(prompts)
        check_prompt_lengths(prompts, prompt_ids, self.max_completion_length, self.model.config)
        return (prompt_ids, *rest)

    def _logit_chunk_size(self, mini_batch: int, completion_length: int, vocab_size: int) -> int:
        """Rows of one logit chunk: `logit_chunk_multiplier`'s rule, in one place for the step and its OOM retry."""
        return oom_retry.logit_chunk_rows(mini_batch, self.args.logit_chunk_multiplier, completion_length, vocab_size)

    def _planned_sizes(self, model, sequences: int, length: int, completion: int, free_bytes=None) -> tuple[int, int]:
        """`(mini batch, MLP tiles)` of one log-prob pass: the configured values, with `None` resolved.

        On CUDA (or with `free_bytes` given) the memory planner picks what is `None`: the largest mini batch, then the
        fewest MLP tiles, that fit in the free memory; decided once per `(sequences, length, completion)` and logged
        when it splits the batch or tiles. Elsewhere `None` means all sequences and no tiling.
        """
        fixed_batch, fixed_tiles = self.args.grpo_mini_batch, self.args.tiled_mlp_chunks
        if fixed_batch is not None and fixed_tiles is not None:
            return fixed_batch, fixed_tiles
        if free_bytes is None and self.accelerator.device.type != "cuda":
            return fixed_batch or sequences, fixed_tiles or 1
        planned = self._planned_mini_batches
        key = (sequences, length, completion)
        if key not in planned:
            from .memory.planner import auto_chunk_sizes

            if free_bytes is None:
                free_bytes = (
                    torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
                )
            sizes = auto_chunk_sizes(
                model.config, free_bytes, sequences, length - completion, completion,
                mode=_training_mode(model), offload_checkpoints=self._offload_checkpoints(),
                optimizer_states_allocated=self.state.global_step > 0, tile_mlps=fixed_tiles is None,
                grpo_mini_batch=fixed_batch,
            )  # fmt: skip
            planned[key] = (fixed_batch or sizes.grpo_mini_batch, fixed_tiles or sizes.tiled_mlp_chunks)
            if planned[key][0] < sequences or planned[key][1] > 1:
                logger.warning(
                    "The memory planner runs %d of %d sequences per decoder pass with %d MLP tile(s) "
                    "(%.1f GiB free, %d + %d tokens each).",
                    *planned[key], sequences, free_bytes / 2**30, length - completion, completion,
                )  # fmt: skip
        return planned[key]

    def _offload_checkpoints(self) -> bool:
        setting = self.args.offload_checkpoints
        if setting is None:
            return self.args.gradient_checkpointing and self.accelerator.device.type == "cuda"
        return setting

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """Per-token log-probs `[B, logits_to_keep]` (float32) of the completion tokens, and their entropies."""
        unwrapped = self.accelerator.unwrap_model(model)
        if self._forward_redirection.needed(model, unwrapped):
            # Run this method on the unwrapped model inside the wrapper's forward, so DDP arms its gradient sync and
            # FSDP2/ZeRO-3 gather what they shard (see `trl_longctx.distributed`).
            return self._forward_redirection(
                model, unwrapped, self._get_per_token_logps_and_entropies, unwrapped, input_ids, attention_mask,
                logits_to_keep, batch_size, compute_entropy, compute_aux_loss, **multimodal,
            )  # fmt: skip
        decoder, lm_head = decoder_and_lm_head(unwrapped)
        head = plain_lm_head_weights(lm_head)
        if compute_aux_loss or head is None or any(multimodal.get(k) is not None for k in _MULTIMODAL_KWARGS):
            # MoE aux losses, adapters on the lm_head and images stay on TRL's path.
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip
        weight, bias = (full_tensor(t) for t in head)
        transform = logit_transform_from_config(unwrapped.config)
        sequences = batch_size or input_ids.size(0)
        mini_batch, mlp_tiles = self._planned_sizes(unwrapped, sequences, input_ids.size(1), logits_to_keep)
        chunk_size = self._logit_chunk_size(mini_batch, logits_to_keep, weight.size(0))
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), mini_batch):
            ids = input_ids[start : start + mini_batch]
            with (
                self.accelerator.autocast(),
                self.checkpoint_offloader.offload(unwrapped, self._offload_checkpoints()),
                tile_mlps(unwrapped, mlp_tiles),
            ):
                hidden = decoder(
                    input_ids=ids, attention_mask=attention_mask[start : start + mini_batch], use_cache=False
                ).last_hidden_state
            # Position t predicts token t + 1: the completion's tokens are predicted by the positions just before.
            hidden = hidden[:, -logits_to_keep - 1 : -1].to(weight.dtype)
            outputs = selective_logprobs(
                hidden,
                weight,
                ids[:, -logits_to_keep:],
                bias=bias,
                temperature=self.temperature,
                logit_scale=transform.logit_scale,
                logit_divisor=transform.logit_divisor,
                softcap=transform.softcap,
                return_entropy=compute_entropy,
                backend=self.args.logprob_backend,
                chunk_size=chunk_size,
            )
            logps, entropies = outputs if compute_entropy else (outputs, None)
            all_logps.append(logps)
            if compute_entropy:
                all_entropies.append(entropies)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        logps = torch.cat(all_logps, dim=0)
        check_finite(logps, "per-token log-probs", self.state.global_step + 1, skip=self.args.skip_nonfinite_steps)
        return logps, entropies, None


def _training_mode(model) -> str:
    """The planner's mode of `model`: "qlora" (LoRA on 4-bit bitsandbytes weights), "lora" or "full"."""
    if not hasattr(model, "peft_config"):
        return "full"
    return "qlora" if getattr(model, "is_loaded_in_4bit", False) else "lora"


def _resolve_kv_standby(args: LongContextGRPOConfig | None) -> bool:
    """`vllm_kv_standby` with `None` resolved: on where vllm_standby implements it (CPU; CUDA with vLLM 0.25-0.28)."""
    from vllm_standby import kv_standby_supported

    requested = None if args is None else args.vllm_kv_standby
    supported = kv_standby_supported()
    if requested and not supported:
        raise ValueError(
            "vllm_kv_standby=True needs vLLM's CPU platform or CUDA with vLLM 0.25-0.28; allowed here: False or None "
            "(automatic)."
        )
    return supported if requested is None else requested


def _uses_vllm_sleep_for_standby(args: LongContextGRPOConfig) -> bool:
    """Whether KV standby runs through TRL's sleep-mode calls: colocate mode on CUDA, TRL's own engine."""
    if not (args.use_vllm and args.vllm_mode == "colocate"):
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cuda() and _resolve_kv_standby(args)


def _resolve_shared_weights(args: LongContextGRPOConfig, model, peft_config, quantization_config=None) -> bool:
    """`vllm_shared_weights` with `None` resolved: on for a LoRA run from a model path where KV standby runs."""
    from vllm_standby import kv_standby_supported

    requested = args.vllm_shared_weights
    if requested is False:
        return False
    if quantization_config is not None:
        if requested and args.vllm_merge_adapter:
            raise ValueError(
                "vllm_merge_adapter=True cannot merge a LoRA adapter into 4-bit shared weights (QLoRA). Allowed with "
                "a quantization_config and vllm_shared_weights=True: False or None (automatic: off)."
            )
        problem = _shared_4bit_problem(quantization_config)
        if problem is not None:
            if requested:
                raise ValueError(
                    f"vllm_shared_weights=True with a quantized (QLoRA) model: {problem}. Allowed here: False or None "
                    "(automatic: off)."
                )
            return False
        if args.vllm_merge_adapter:
            return False  # merged rollouts asked for: only possible with TRL's own (unshared) engine
    if peft_config is None or getattr(peft_config, "peft_type", None) is None or peft_config.peft_type.value != "LORA":
        if requested:
            raise ValueError(
                "vllm_shared_weights=True needs a LoRA peft_config: full fine-tuning would train vLLM's weights in "
                "place. Allowed without LoRA: False or None."
            )
        return False
    if not isinstance(model, str):
        if requested:
            raise ValueError("vllm_shared_weights=True needs the model as a path or id, not an instance.")
        return False
    if args.vllm_enable_sleep_mode or args.vllm_tensor_parallel_size != 1:
        if requested:
            raise ValueError(
                "vllm_shared_weights=True needs vllm_enable_sleep_mode=False and vllm_tensor_parallel_size=1."
            )
        return False
    return True if requested else kv_standby_supported()


def _shared_4bit_problem(quantization_config) -> str | None:
    """Why this quantization cannot be shared with vLLM, or `None` when it can: vLLM (0.25-0.28) quantizes the
    checkpoint to bitsandbytes 4-bit NF4 itself, and the trainer's layers are views of its shards."""
    from vllm_standby.shared_4bit import bitsandbytes_in_vllm

    if not getattr(quantization_config, "load_in_4bit", False) or (
        getattr(quantization_config, "bnb_4bit_quant_type", None) != "nf4"
    ):
        return "shared 4-bit weights need BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'), as vLLM quantizes"
    if not bitsandbytes_in_vllm():
        import vllm

        return f"vLLM {vllm.__version__} has no bitsandbytes quantization (vLLM 0.25-0.28 on CUDA have it)"
    return None


def _shared_model_and_engine(model_path: str, args: LongContextGRPOConfig, peft_config, quantized: bool = False):
    """Build the colocated engine, then the trainer's base model as views of its weights (one copy in memory); with
    `quantized`, vLLM quantizes the checkpoint to bitsandbytes NF4 and the trainer gets `Linear4bit` views (QLoRA)."""
    from accelerate import PartialState

    from vllm_standby import shared_hf_model

    from .vllm_shared import build_shared_engine, resolve_merge_adapter

    enable_lora = not resolve_merge_adapter(args, quantized)
    llm = build_shared_engine(
        model_path, args, PartialState(), lora_rank=peft_config.r, enable_lora=enable_lora, quantized=quantized
    )
    hf_model = shared_hf_model(llm)
    hf_model.name_or_path = hf_model.config._name_or_path = model_path
    return hf_model.train(), llm
