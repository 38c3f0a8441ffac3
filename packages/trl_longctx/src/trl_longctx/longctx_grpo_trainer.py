"""`LongContextGRPOTrainer`: TRL's `GRPOTrainer` with per-token log-probs that never materialize the logits."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time

from trl import GRPOTrainer

from . import oom_retry
from .attention import choose_attention, use_flex_attention
from .checkpoints import atomic_checkpoint
from .compile_regions import compile_decoder_layers
from .distributed import ForwardRedirection, ReleaseLmHeadCallback, full_tensor
from .fault_callbacks import fault_callbacks
from .guards import check_finite, check_prompt_lengths, check_train_dataset, guard_loss, guard_reward_functions
from .image_prompts import wrap_engine_generate
from .kernel_warm_up import start_kernel_warm_up
from .logprob_pass import LogProbPass, resolved_backend
from .longctx_grpo_config import LongContextGRPOConfig
from .memory.offload_checkpoints import ReleaseBuffersCallback, describe_growth, describe_reservation
from .memory.shapes import VisionLoad
from .model_heads import decoder_and_lm_head, logit_transform_from_config, plain_lm_head_weights
from .moe_aux import RouterAuxLoss, RouterAuxLossUnsupported, router_aux_loss
from .quantized_experts import unquantized_experts_notice
from .rollout_plan import resolve_rollout_plan
from .rollout_standby import kv_cache_for_rollout
from .sequence_parallel import SequenceParallelPass, refuse_before_load, sequence_parallel_pass
from .training_layout import describe_layout, layout_problem
from .trl_contract import check_trl_contract
from .vision_language import (
    ImageInputs,
    VisionLanguageParts,
    VisionLanguageUnsupported,
    most_image_patches,
    refuse_image_token_mismatch,
    vision_parts,
)

logger = logging.getLogger(__name__)


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
        check_trl_contract()  # the TRL hooks overridden here are still there, as reviewed (before any load)
        args = _long_context_args(args, model)
        check_train_dataset(kwargs.get("train_dataset"))
        resolved_backend(args, args.device)  # a logit chunk the backend cannot honour is refused before any load
        refuse_before_load(args, model, kwargs.get("peft_config"))  # what sequence parallelism cannot split
        # How the run generates: decided once, before any model or engine is built (bad requests raise here).
        self.rollout_plan = plan = resolve_rollout_plan(
            args, model, kwargs.get("peft_config"), _quantization_config(args, kwargs),
            has_rollout_func=kwargs.get("rollout_func") is not None,
        )  # fmt: skip
        if plan.needs_vllm_standby:
            # Live before any engine exists: the CPU build's weight patch, the in-memory LoRA loader, KV-only sleep.
            import vllm_standby

            vllm_standby.enable()
        self._shares_vllm_weights = plan.shared_weights
        engine = None
        if plan.shared_weights:
            from .vllm_shared import build_shared_model_and_engine

            model, engine = build_shared_model_and_engine(model, args, kwargs["peft_config"], plan)
            # The model is built (vLLM quantized it in 4 bits when asked): TRL must not load or quantize another.
            kwargs.pop("quantization_config", None)
        # TRL works on its own view of the config (no second engine with shared weights); `args` stays as given.
        # With shared weights the model reaches TRL built, from `model_init_kwargs`: TRL's note that they are ignored
        # would be wrong (TRL still uses them for reward models given by name, so they stay).
        quiet = _without_trl_note(MODEL_INIT_KWARGS_NOTE) if plan.shared_weights else contextlib.nullcontext()
        with quiet:
            super().__init__(model, reward_funcs, args=plan.trl_args(args), **kwargs)
        self.args.use_vllm, self.args.vllm_enable_sleep_mode = plan.uses_vllm, args.vllm_enable_sleep_mode
        self._attach_shared_engine(engine)
        if plan.engine == "vllm-colocate" and not plan.shared_weights:
            wrap_engine_generate(self.vllm_generation.llm)  # image prompts as vLLM takes them (`image_prompts`)
        self._select_attention()
        self._prepare_log_prob_path()
        guard_reward_functions(self)  # errors name the reward function and the step
        logger.warning(plan.describe())
        for notice in plan.notices:
            logger.warning(notice.message())
        if (experts := unquantized_experts_notice(self.model)) is not None:
            logger.warning(experts)
        if args.retry_on_oom and (why := oom_retry.retry_unsupported_reason(self.accelerator)) is not None:
            logger.warning(f"The out-of-memory retry is off in this run: {why}. retry_on_oom=False silences this.")
        # Last, after TRL's and ours: a NaN weight or a preemption signal stops the run with a complete checkpoint.
        for callback in fault_callbacks(self, max_consecutive_nonfinite=args.max_consecutive_nonfinite):
            self.add_callback(callback)
        if plan.kv_standby == "trainer":
            # The engine was built with its KV cache; training starts now, so release it until the first rollout.
            from vllm_standby import release_kv_cache

            release_kv_cache(self.vllm_generation.llm)
        # After every CUDA graph capture (vLLM's engine is built): the kernels compile while the first rollout runs.
        self._kernel_warm_up = start_kernel_warm_up(
            args.warm_up_kernels, self.logprob_pass.backend, self.accelerator.unwrap_model(self.model)
        )

    def _attach_shared_engine(self, engine) -> None:
        """Use `engine` (built before TRL's `__init__`, sharing the trainer's weights) for rollouts, as TRL's colocate
        mode would use its own."""
        self._adapter_merger = None
        if engine is None:
            return
        from .vllm_shared import make_generation

        self.use_vllm = True
        self.vllm_generation = make_generation(self, engine)
        self._last_loaded_step = -1
        # Accelerate's `prepare` would call `model.to(accelerator.device)`; on CPU that device can be `cpu:0` while
        # vLLM's tensors are on `cpu`, and `Tensor.to` then returns copies: the sharing would end silently.
        self.accelerator.device_placement = False
        if self.rollout_plan.adapter_transport == "merged":
            from .merged_rollout import AdapterMerger

            self._adapter_merger = AdapterMerger(self.accelerator.unwrap_model(self.model))

    def _select_attention(self) -> None:
        """Resolve `flex_attention` for the model and the `training_layout` (`trl_longctx.attention`), switch it (and a
        separate reference model) to our flex attention when chosen, and log which attention and layout run.

        Raises:
            ValueError: The `training_layout` cannot train this model (`training_layout.layout_problem` says why).
        """
        unwrapped, layout = self.accelerator.unwrap_model(self.model), self.args.training_layout
        self.attention = choose_attention(self.args.flex_attention, unwrapped, self.accelerator.device, layout)
        if self.attention.ours:
            use_flex_attention(unwrapped)
            if getattr(self, "ref_model", None) is not None:
                use_flex_attention(self.accelerator.unwrap_model(self.ref_model))
        logger.warning(self.attention.describe())
        if (problem := layout_problem(unwrapped, layout, self.aux_loss_enabled)) is not None:
            raise ValueError(
                f"training_layout={layout!r} cannot train this model: {problem}. training_layout='padded' can."
            )
        logger.warning(describe_layout(layout, self.attention.implementation))

    def _prepare_log_prob_path(self) -> None:
        """What the fused log-prob pass reuses across steps: compiled layers, the checkpoint offloader, the planner,
        and with `sequence_parallel_size > 1` its process group and Ulysses attention (refusing what does not
        compose)."""
        compile_setting = getattr(self.args, "compile_decoder_layers", None)
        if compile_setting is not None:
            # Once, on the model our log-prob path runs (the PEFT model, not an accelerate wrapper); lazy: each
            # shape compiles at its first forward.
            compile_decoder_layers(self.accelerator.unwrap_model(self.model), compile_setting)
        unwrapped = self.accelerator.unwrap_model(self.model)
        peft = getattr(unwrapped, "peft_config", {}).get("default")
        # The sizes of every pass (planner, OOM retry caps) and the offloader whose pinned buffers every step reuses.
        expert_lora = any("experts" in name for name in (getattr(peft, "target_parameters", None) or ()))
        self.logprob_pass = LogProbPass(
            self.args, self.accelerator.device, mode=_training_mode(unwrapped), lora_rank=getattr(peft, "r", None),
            attention=self.attention.implementation, lora_experts=expert_lora, router_aux_loss=self.aux_loss_enabled,
            lora_dropout=bool(getattr(peft, "lora_dropout", 0)),
        )  # fmt: skip
        self.add_callback(ReleaseBuffersCallback(self.logprob_pass.offloader))
        self.add_callback(ReleaseLmHeadCallback(unwrapped))  # ZeRO-3 only: the lm_head our passes gather
        self._forward_redirection = ForwardRedirection()
        ref_model = getattr(self, "ref_model", None)
        self.sequence_parallel = sequence_parallel_pass(
            self.args, unwrapped, self.logprob_pass,
            ref_model=None if ref_model is None else self.accelerator.unwrap_model(ref_model),
            refusals={"router_aux_loss": self.aux_loss_enabled, "fsdp": self.is_fsdp_enabled,
                      "deepspeed": self.is_deepspeed_enabled,
                      "lm_head_adapter": plain_lm_head_weights(decoder_and_lm_head(unwrapped)[1]) is None},
        )  # fmt: skip

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

    def _generate(self, prompts):
        """TRL's rollout. Once it returns, the lengths of the steps that train on it are known: host buffers their
        offloaded checkpoints lack are allocated and pinned in the background (`reserve_host_buffers`) while TRL
        scores the completions and computes their old log-probs, instead of inside the first step."""
        generated = super()._generate(prompts)
        if self.model.training:
            prompt_ids, completion_ids = generated[0], generated[1]
            config = self.accelerator.unwrap_model(self.model).config
            sequences = (itertools.chain(p, c) for p, c in zip(prompt_ids, completion_ids, strict=True))
            patches = most_image_patches(config, sequences)
            self.reserve_host_buffers(
                max(map(len, prompt_ids)), max(map(len, completion_ids), default=0), patches=patches
            )
        return generated

    def reserve_host_buffers(self, prompt_length: int, completion_length: int, patches: int = 0) -> list[int]:
        """Start pinning, in the background, the host buffers that a training step over `per_device_train_batch_size`
        sequences of these lengths (TRL pads to them, to `pad_to_multiple_of`) offloads into and the pool lacks;
        `patches`: a vision-language model's image patches per sequence (the most of any), which the step's plan of
        sequences per pass counts.

        Nothing is reserved where the step's sizes are not planned here: without offloaded checkpoints, under
        `sequence_parallel_size > 1` (each rank offloads its slices), for vision-language models the fused pass does
        not serve, and where the pass goes to TRL's path (an adapter on the lm_head, a router aux loss we do not
        compute).

        Returns:
            The bytes of the buffers a step needs (`LogProbPass.host_buffer_sizes`); empty when nothing is reserved.
        """
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not self.logprob_pass.offload or self.sequence_parallel is not None:
            return []
        vision = VisionLoad()
        if getattr(unwrapped.config, "vision_config", None) is not None:
            try:
                vision = VisionLoad(patches, vision_parts(unwrapped, {}).vision_trained)
            except VisionLanguageUnsupported:
                return []
        if plain_lm_head_weights(decoder_and_lm_head(unwrapped)[1]) is None or (
            self.aux_loss_enabled and isinstance(_router_aux_loss_or_reason(unwrapped), str)
        ):
            return []
        multiple = self.args.pad_to_multiple_of or 1
        prompt, completion = (-(-n // multiple) * multiple for n in (prompt_length, completion_length))
        sizes = self.logprob_pass.host_buffer_sizes(
            unwrapped.config, unwrapped.config.get_text_config().vocab_size, self.args.per_device_train_batch_size,
            prompt + completion, completion, unwrapped.get_input_embeddings().weight.element_size(),
            optimizer_states_allocated=self.state.global_step > 0, vision=vision,
        )  # fmt: skip
        if sizes:
            self.logprob_pass.offloader.reserve(sizes)
        return sizes

    def _generate_single_turn(self, *args, **kwargs):
        """TRL's rollout, with vLLM's KV cache restored just before and released right after (`rollout_plan`), and
        with shared weights in merged mode the adapter merged into them for its length.

        Raises:
            RuntimeError: If vLLM fails; the message names the training step and the engine's error (chained). The
                engine's unfinished requests are aborted and its KV cache released, so the run can checkpoint or go
                on.
        """
        try:
            with contextlib.ExitStack() as rollout:
                if self.rollout_plan.kv_standby == "trainer":
                    rollout.enter_context(kv_cache_for_rollout(self.vllm_generation.llm))
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
        """TRL's loss, refused (or the step skipped, with `skip_nonfinite_steps`) when it is NaN or Inf. Host buffers the
        offloaded checkpoints allocated for it (the first step's, or a longer sequence's) are logged with their time,
        and those reserved for it after the rollout with the time the step waited for them."""
        offloader = self.logprob_pass.offloader
        before = offloader.allocation_record
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        skip, step = self.args.skip_nonfinite_steps, self.state.global_step + 1
        for reservation in offloader.settled_reservations():
            logger.info("step %d: %s", step, describe_reservation(reservation))
        if (grown := describe_growth(before, offloader.allocation_record)) is not None:
            logger.info("step %d: %s", step, grown)
        guarded = guard_loss(loss, model, step, skip=skip, accelerator=self.accelerator)
        if skip and self.model.training:
            self._metrics["train"]["nonfinite_skipped"].append(float(guarded is not loss))
        return guarded

    # The run's sequence-parallel log-prob pass (`sequence_parallel_size > 1`), set when the trainer is built.
    sequence_parallel: SequenceParallelPass | None = None

    # The try of the training step under way, which `_prepare_inputs` tells about its batch (see `training_step`).
    _step_attempt: oom_retry.StepAttempt | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step; on running out of memory in the log-prob pass, lower its sizes for the rest of the run and retry
        the step once.

        With `retry_on_oom` in a single-process run, the failed try is undone first (`oom_retry.StepAttempt`: its
        gradients and metrics dropped, earlier micro-steps' gradients kept) and the retry reuses its prepared batch.
        What is lowered is what the failing pass really ran with (`logprob_pass.lowered_sizes`).

        Raises:
            oom_retry.OutOfMemoryRetryError: If the retry runs out of memory too, there is nothing left to lower, or
                the failure came from outside the log-prob pass.
        """
        if self.sequence_parallel is not None:  # multi-process: no retry; the Ulysses attention lasts the step
            with self.sequence_parallel.step():
                return super().training_step(model, inputs, num_items_in_batch)
        if not (self.args.retry_on_oom and oom_retry.retry_supported(self.accelerator)):
            return super().training_step(model, inputs, num_items_in_batch)
        run = functools.partial(super().training_step, model, inputs, num_items_in_batch)
        step, passes = self.state.global_step + 1, self.logprob_pass
        started = time.perf_counter()
        first = oom_retry.StepAttempt(self, model)
        try:
            passes.begin_try()
            with first:
                return run()
        except Exception as error:
            if not oom_retry.is_out_of_memory(error):
                raise
            summary, failure = oom_retry.first_line(error), error
        # Out of the `except` block the error's traceback, which held the failed try's tensors, is gone.
        tried = passes.used[-1:]
        lowered = passes.lower_after_oom()
        if lowered is None:
            raise oom_retry.OutOfMemoryRetryError(oom_retry.failure_message(step, summary, tried)) from failure
        del failure
        # TRL's `step_time` adds each `training_step`'s time once it returns: the failed try (its rollout included)
        # never returned, and the retry alone would be reported as the step's time.
        self._current_train_step_time += time.perf_counter() - started
        oom_retry.free_memory(self.accelerator.device)
        logger.warning(oom_retry.lowering_message(step, summary, tried[0], lowered))
        try:
            passes.begin_try()
            with oom_retry.StepAttempt(self, model, batch=first.batch):
                return run()
        except Exception as error:
            if not oom_retry.is_out_of_memory(error):
                raise
            tried += passes.used[-1:]
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
        if self._kernel_warm_up is not None:
            self._kernel_warm_up.wait()  # the first pass only; then a no-op
        if self.sequence_parallel is not None:  # no aux loss, images or lm_head adapter (refused when built)
            logps, entropies = self.sequence_parallel(
                unwrapped, decoder, tuple(full_tensor(t) for t in head), input_ids, attention_mask, logits_to_keep,
                compute_entropy=compute_entropy, temperature=self.temperature,
                transform=logit_transform_from_config(unwrapped.config), autocast=self.accelerator.autocast,
            )  # fmt: skip
            check_finite(logps, "per-token log-probs", self.state.global_step + 1, skip=self.args.skip_nonfinite_steps)
            return logps, entropies, None
        aux_loss = _router_aux_loss_or_reason(unwrapped) if compute_aux_loss else None
        images = {k: v for k, v in multimodal.items() if v is not None}
        if images:  # on either path the model would fail on it with a bare count
            refuse_image_token_mismatch(unwrapped.config, input_ids, images, self.state.global_step + 1)
        vision = _vision_parts_or_reason(unwrapped, images) if images else None
        if isinstance(aux_loss, str) or head is None or isinstance(vision, str):
            # Adapters on the lm_head, images we do not serve and MoE models whose aux loss we cannot reproduce stay on
            # TRL's path.
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip
        on_images = {}
        if vision is not None:
            # The multimodal backbone (vision tower + language decoder) runs; checkpoints and MLP tiles attach to the
            # language decoder's layers.
            decoder = vision.backbone
            on_images = {"images": ImageInputs(images, input_ids.size(0)), "layers": vision.language_model,
                         "vision_trained": vision.vision_trained}  # fmt: skip
        logps, entropies, aux = self.logprob_pass(
            unwrapped, decoder, tuple(full_tensor(t) for t in head), input_ids, attention_mask, logits_to_keep,
            sequences=batch_size, compute_entropy=compute_entropy, temperature=self.temperature,
            transform=logit_transform_from_config(unwrapped.config), autocast=self.accelerator.autocast,
            optimizer_states_allocated=self.state.global_step > 0, aux_loss=aux_loss, **on_images,
        )  # fmt: skip
        check_finite(logps, "per-token log-probs", self.state.global_step + 1, skip=self.args.skip_nonfinite_steps)
        return logps, entropies, aux


# Reasons a pass was handed to TRL's path, each logged once: MoE aux losses and image inputs we cannot serve.
_HANDED_BACK: set[str] = set()


# The start of the warning TRL's `GRPOTrainer.__init__` logs when `model_init_kwargs` is set and the model is built.
MODEL_INIT_KWARGS_NOTE = "You passed `model_init_kwargs` to the `GRPOConfig`, but your model is already instantiated."


@contextlib.contextmanager
def _without_trl_note(note: str):
    """Drop the records of TRL's trainer logger that contain `note`, for the length of the block only."""
    trl_logger = logging.getLogger("trl.trainer.grpo_trainer")

    def keep(record: logging.LogRecord) -> bool:
        return note not in record.getMessage()

    trl_logger.addFilter(keep)
    try:
        yield
    finally:
        trl_logger.removeFilter(keep)


def _router_aux_loss_or_reason(model) -> RouterAuxLoss | str:
    """`moe_aux.router_aux_loss(model)`, or why it cannot be served (logged once): the log-prob pass then goes to
    TRL's path, which runs the causal LM's own forward.

    The warning names the way out that keeps the fused path: TRL 1.16's `GRPOTrainer.__init__` reads the coefficient
    once, from `args.router_aux_loss_coef` or, when that is `None`, from the model config's, and asks for the aux loss
    (`compute_aux_loss=self.aux_loss_enabled`) only when it is non-zero.
    """
    return _served_or_reason(
        lambda: router_aux_loss(model), RouterAuxLossUnsupported,
        "The router aux loss is computed on TRL's log-prob path (no fused log-probs, no planned sizes): %s To keep "
        "the fused path without the aux loss, build the trainer with router_aux_loss_coef=0.0 in its config, or in "
        "the model config with the trainer config's router_aux_loss_coef left at None.",
    )  # fmt: skip


def _vision_parts_or_reason(model, images: dict) -> VisionLanguageParts | str:
    """`vision_language.vision_parts(model, images)`, or why the pass cannot serve these images (logged once): the
    log-prob pass then goes to TRL's path, which runs the causal LM's own forward."""
    return _served_or_reason(
        lambda: vision_parts(model, images), VisionLanguageUnsupported,
        "Image inputs go to TRL's log-prob path (no fused log-probs, no offloaded checkpoints, no planned sizes): %s",
    )  # fmt: skip


def _served_or_reason(serve, unsupported: type[Exception], message: str):
    """`serve()`, or the reason an `unsupported` error gives, logged with `message` the first time it is seen."""
    try:
        return serve()
    except unsupported as error:
        reason = str(error)
        if reason not in _HANDED_BACK:
            _HANDED_BACK.add(reason)
            logger.warning(message, reason)
        return reason


def _training_mode(model) -> str:
    """The planner's mode of `model`: "qlora" (LoRA on 4-bit bitsandbytes weights), "lora" or "full"."""
    if not hasattr(model, "peft_config"):
        return "full"
    return "qlora" if getattr(model, "is_loaded_in_4bit", False) else "lora"


def _long_context_args(args: LongContextGRPOConfig | None, model) -> LongContextGRPOConfig:
    """`args`, or TRL's default for it (`<model name>-GRPO` as the output folder) as a `LongContextGRPOConfig`."""
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
        return LongContextGRPOConfig(f"{name.rstrip('/').split('/')[-1]}-GRPO")
    if not isinstance(args, LongContextGRPOConfig):
        raise TypeError(f"args must be a LongContextGRPOConfig, got {type(args).__name__}.")
    return args


def _quantization_config(args: LongContextGRPOConfig, kwargs: dict):
    """The quantization config the model would be loaded with: the trainer argument or `model_init_kwargs`'."""
    return kwargs.get("quantization_config") or (args.model_init_kwargs or {}).get("quantization_config")
