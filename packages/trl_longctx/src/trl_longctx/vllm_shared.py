"""Colocated vLLM that shares the trainer's frozen base weights; the LoRA adapter reaches it without a second copy.

TRL's colocate mode keeps two copies of the weights (the trainer's and vLLM's) and pushes merged weights into vLLM
at every step. Here the engine is built first and the trainer's base model is made of views of vLLM's tensors
(`vllm_standby.shared_hf_model`): one copy of the weights. The adapter is merged into those tensors for the length of
each rollout and the base restored exactly after (`trl_longctx.merged_rollout`; the default on CUDA), or handed to
vLLM as in-memory tensors under a fresh id (`vllm_standby.lora_request`; CPU, 4-bit weights). The KV cache is sized
to one rollout (`rollout_kv_cache_kwargs`). This module imports vLLM; the trainer imports it only when shared weights
are on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import AutoConfig
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.utils import ensure_master_addr_port

from vllm_standby import StandbyLLM, lora_request

from .image_prompts import one_token_per_image

logger = logging.getLogger(__name__)


class AdapterStandbyLLM(StandbyLLM):
    """A `StandbyLLM` that applies its current LoRA adapter (`self.adapter`) to every `generate` call, returns token
    ids without text where nothing needs the text (`token_ids_only`), and gives vLLM image prompts with one
    placeholder token per image (`one_token_per_image`)."""

    adapter = None

    def generate(self, prompts: Any, sampling_params: Any = None, *args: Any, lora_request: Any = None, **kwargs: Any):
        image_token_id = getattr(self.llm_engine.model_config.hf_config, "image_token_id", None)
        return super().generate(
            one_token_per_image(prompts, image_token_id), token_ids_only(sampling_params), *args,
            lora_request=lora_request or self.adapter, **kwargs,
        )  # fmt: skip


def token_ids_only(sampling_params: Any) -> Any:
    """Copies of vLLM `SamplingParams` (one or a list) with `detokenize=False`, except those with stop strings.

    TRL's colocate rollout reads only the token ids (and their log-probs) and decodes completions itself, so vLLM's
    incremental detokenization of every sampled token (and of its log-prob's token) is work on the decode loop's CPU
    path for nothing. Stop strings need the text: those params are returned as they are. `None` stays `None`.
    """
    if sampling_params is None:
        return None
    if isinstance(sampling_params, list | tuple):
        return [token_ids_only(p) for p in sampling_params]
    if not sampling_params.detokenize or sampling_params.stop:
        return sampling_params
    params = sampling_params.clone()
    params.detokenize = False
    return params


def build_shared_model_and_engine(model_path: str, args, peft_config, plan) -> tuple[Any, AdapterStandbyLLM]:
    """Build the colocated engine, then the trainer's base model as views of its weights (one copy in memory).

    With `plan.quantized` vLLM quantizes the checkpoint to bitsandbytes NF4 and the trainer gets `Linear4bit` views
    (QLoRA); with `plan.fp8` to FP8, and the trainer gets `vllm_standby.Fp8Linear` views running `plan.fp8_matmul`.
    vLLM's LoRA support is built only when the adapter reaches it as a request (`plan.adapter_transport`).

    Returns:
        `(model, engine)`: the transformers model in training mode and the engine.
    """
    from accelerate import PartialState

    from vllm_standby import shared_hf_model

    llm = build_shared_engine(
        model_path, args, PartialState(), lora_rank=peft_config.r,
        enable_lora=plan.adapter_transport == "lora-request", quantized=plan.quantized,
        kv_cache_sizing=plan.kv_cache_sizing, fp8=plan.fp8,
    )  # fmt: skip
    hf_model = shared_hf_model(llm, fp8_matmul=plan.fp8_matmul or "auto")
    if plan.fp8 is not None:
        from vllm_standby.fp8_linear import matmul_summary

        for matmul, (count, reason) in matmul_summary(hf_model).items():
            logger.info("FP8 shared weights: %d layers multiply with %s (%s).", count, matmul, reason)
    hf_model.name_or_path = hf_model.config._name_or_path = model_path
    return hf_model.train(), llm


def build_shared_engine(
    model_path: str,
    args,
    accelerator,
    lora_rank: int,
    enable_lora: bool = True,
    quantized: bool = False,
    kv_cache_sizing: str = "rollout",
    fp8: str | None = None,
) -> AdapterStandbyLLM:
    """Build the colocated engine as TRL's colocate mode does, with LoRA enabled and the weights' own dtype (and, on
    CUDA, `vllm_standby`'s fast start).

    Args:
        model_path: Local path or id of the model (transformers and vLLM read the same checkpoint).
        args: The trainer's `LongContextGRPOConfig`.
        accelerator: The trainer's accelerator (its process index seeds sampling, as in TRL).
        lora_rank: Rank of the trainer's LoRA adapter (vLLM's `max_lora_rank`).
        enable_lora: Build vLLM's LoRA support (off when the adapter is merged into the shared weights instead).
        quantized: vLLM quantizes the checkpoint to bitsandbytes 4-bit NF4 at load (QLoRA with shared weights).
        kv_cache_sizing: `"rollout"` (see `rollout_kv_cache_kwargs`) or `"utilization"`.
        fp8: vLLM quantizes the checkpoint to FP8 at load with these scales (`vllm_fp8_weights`), or `None`.

    Raises:
        ValueError: FP8 weights asked for a checkpoint that would load in float32 (vLLM's FP8 layers take bf16/fp16
            activations only).
    """
    os.environ["RANK"] = str(accelerator.process_index)
    os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
    os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
    ensure_master_addr_port()
    from vllm.platforms import current_platform

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    dtype = weights_dtype(args, config)
    quantization = {}
    if quantized:
        quantization = {"quantization": "bitsandbytes"}
    elif fp8 is not None:
        from vllm_standby.shared_fp8 import VLLM_QUANTIZATION

        if dtype not in ("bfloat16", "float16"):
            raise ValueError(
                f"vllm_fp8_weights={fp8!r} needs the model in bfloat16 or float16 (vLLM's FP8 layers take 16-bit "
                f"activations), and {model_path} loads in {dtype}: set model_init_kwargs={{'dtype': 'bfloat16'}}."
            )
        quantization = {"quantization": VLLM_QUANTIZATION[fp8]}
    max_num_seqs = args.per_device_train_batch_size * args.steps_per_generation
    kv_cache = (
        rollout_kv_cache_kwargs(config, args, max_num_seqs, _dtype_bytes(dtype))
        if kv_cache_sizing == "rollout"
        else {}
    )
    return AdapterStandbyLLM(
        # CUDA: decode-only CUDA graphs up to max_num_seqs and a quieter compile (`vllm_standby.fast_start`).
        fast_start=current_platform.is_cuda(),
        model=model_path,
        dtype=dtype,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_len=args.vllm_max_model_length,
        max_num_seqs=max_num_seqs,
        model_impl=args.vllm_model_impl,
        distributed_executor_backend="external_launcher",
        seed=accelerator.process_index,
        # As TRL: vLLM's memory profiler misreads its 32768 default; temperature must reach the sampled logprobs.
        max_num_batched_tokens=4096,
        logprobs_mode="processed_logprobs",
        # Unlike TRL (vLLM's default): block hashing costs each decode step more than the shared prompt saves.
        enable_prefix_caching=args.vllm_prefix_caching,
        trust_remote_code=args.trust_remote_code,
        **quantization,
        **kv_cache,
        **(_lora_kwargs(config, lora_rank) if enable_lora else {}),
    )


def _lora_kwargs(config, lora_rank: int) -> dict[str, Any]:
    """vLLM's LoRA settings for the in-memory adapter: one adapter of the trainer's rank; for a vision-language model
    also the adapter's weights on the vision tower and its connector (`enable_tower_connector_lora`, where this vLLM
    has it), which vLLM otherwise leaves out of its rollouts without a word (vllm_standby's adapter loader refuses
    such an adapter then)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    kwargs = {"enable_lora": True, "max_lora_rank": _vllm_lora_rank(lora_rank), "max_loras": 1}
    vision = getattr(config, "vision_config", None) is not None
    if vision and "enable_tower_connector_lora" in {f.name for f in dataclasses.fields(EngineArgs)}:
        kwargs["enable_tower_connector_lora"] = True
    return kwargs


def rollout_kv_cache_kwargs(config, args, max_num_seqs: int, dtype_bytes: int) -> dict[str, int]:
    """`kv_cache_memory_bytes` for a KV cache sized to one rollout (`vllm_kv_cache_sizing="rollout"`), or `{}` for
    vLLM's own sizing from `vllm_gpu_memory_utilization`.

    A rollout runs at most `max_num_seqs` sequences of at most `vllm_max_model_length` tokens at once, so a larger cache is
    never used, only mapped back before and released after every rollout, which costs time in proportion to its
    size. The rollout size is used when it is below a lower bound of what the utilization would give
    (`trl_longctx.memory.rollout_kv`); otherwise the utilization sizes it, and vLLM preempts when it runs short.

    Args:
        config: The model's transformers config.
        args: The trainer's `LongContextGRPOConfig`.
        max_num_seqs: Sequences the engine runs at once.
        dtype_bytes: Bytes per element of the KV cache (the model's dtype).
    """
    import torch
    from vllm.platforms import current_platform

    from .memory.rollout_kv import rollout_kv_cache_bytes, utilization_kv_cache_bytes
    from .memory.shapes import ModelShape

    if args.vllm_kv_cache_sizing != "rollout":
        return {}
    max_model_len = args.vllm_max_model_length
    on_cpu = current_platform.is_cpu()
    if on_cpu and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        logger.info("vLLM KV cache: VLLM_CPU_KVCACHE_SPACE sets it (vllm_kv_cache_sizing='rollout' not applied).")
        return {}
    if not max_model_len:
        # vLLM derives the length from several config keys and scales it for some RoPE types (YaRN: x factor), so
        # `max_position_embeddings` may be shorter or longer than what it would allow: no guess is made here.
        logger.info(
            "vLLM KV cache: sized by vllm_gpu_memory_utilization; set vllm_max_model_length to size it to the rollout."
        )
        return {}
    shape = ModelShape.from_config(config)
    rollout = rollout_kv_cache_bytes(shape, max_num_seqs, max_model_len, dtype_bytes)
    device_bytes = _host_memory_bytes() if on_cpu else torch.cuda.mem_get_info()[1]
    budget = utilization_kv_cache_bytes(shape, args.vllm_gpu_memory_utilization, device_bytes)
    if rollout > budget:
        logger.info(
            "vLLM KV cache: sized by vllm_gpu_memory_utilization=%s (a rollout of %d x %d tokens needs %.2f GiB, "
            "above the %.2f GiB it gives at least).",
            args.vllm_gpu_memory_utilization, max_num_seqs, max_model_len, rollout / 2**30, budget / 2**30,
        )  # fmt: skip
        return {}
    logger.info(
        "vLLM KV cache: %.2f GiB, sized to a rollout of %d x %d tokens (vllm_gpu_memory_utilization=%s would give "
        "at least %.2f GiB).",
        rollout / 2**30, max_num_seqs, max_model_len, args.vllm_gpu_memory_utilization, budget / 2**30,
    )  # fmt: skip
    return {"kv_cache_memory_bytes": rollout}


def weights_dtype(args, config) -> str:
    """The dtype of the shared weights, as transformers would load the model: `model_init_kwargs["dtype"]`, else (or
    for `"auto"`) the checkpoint config's, else float32, transformers' default for a config that names none (vLLM's
    own `"auto"` would cast such a checkpoint to 16 bits instead: the trainer would not train what TRL trains)."""
    requested = (args.model_init_kwargs or {}).get("dtype")
    dtype = requested if requested not in (None, "auto") else (config.get_text_config().dtype or "float32")
    return str(dtype).removeprefix("torch.")


def _dtype_bytes(dtype) -> int:
    """Bytes per element of `dtype` (a `torch.dtype` or its name); 4 when unknown ("auto", None): the KV cache is
    then sized for float32, never too small."""
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def _host_memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().total


# vLLM accepts only these `max_lora_rank` values; any adapter of rank <= the bound fits.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _vllm_lora_rank(rank: int) -> int:
    for bound in _VLLM_LORA_RANKS:
        if rank <= bound:
            return bound
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank ({_VLLM_LORA_RANKS[-1]}).")


class SharedWeightsVLLMGeneration(VLLMGeneration):
    """TRL's `VLLMGeneration` (colocate mode) on a pre-built `AdapterStandbyLLM` whose weights the trainer shares.

    `sync_weights` sends nothing: the base weights are the same tensors, and the adapter goes to vLLM as an
    in-memory `LoRARequest` with a fresh id (vLLM caches adapters by id).
    """

    def __init__(self, llm: AdapterStandbyLLM, merge_adapter: bool = False, **kwargs: Any):
        self._prebuilt_llm = llm
        self.merge_adapter = merge_adapter
        super().__init__(**kwargs)

    def _init_vllm(self):
        if self.mode != "colocate" or self.tensor_parallel_size != 1 or self.enable_sleep_mode:
            raise ValueError(
                "shared vLLM weights need vllm_mode='colocate', vllm_tensor_parallel_size=1 and "
                "vllm_enable_sleep_mode=False."
            )
        self.llm = self._prebuilt_llm
        self._llm_weights_sleeping = False

    def sync_weights(self):
        # Merged mode: the trainer merges the adapter into the shared weights around each rollout (AdapterMerger).
        if not self.merge_adapter:
            self.llm.adapter = lora_request(self.accelerator.unwrap_model(self.model))


def make_generation(trainer, llm: AdapterStandbyLLM) -> SharedWeightsVLLMGeneration:
    """The generation backend TRL's `GRPOTrainer.__init__` would build for colocate mode, on `llm`.

    The keyword arguments mirror TRL 1.16's call (`trl/trainer/grpo_trainer.py`, `VLLMGeneration(...)` in
    `__init__`); `trl_longctx.trl_contract` pins them to `VLLMGeneration.__init__`'s signature and TRL's call.
    """
    args = trainer.args
    return SharedWeightsVLLMGeneration(
        llm,
        # The engine was built for one of the two (`build_shared_model_and_engine`): with LoRA, the adapter goes as a
        # request; without, it is merged into the shared weights for each rollout.
        merge_adapter=llm.llm_engine.vllm_config.lora_config is None,
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        mode=args.vllm_mode,
        structured_outputs_regex=args.vllm_structured_outputs_regex,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.per_device_train_batch_size * args.steps_per_generation,
        enable_sleep_mode=False,  # the shared engine's standby is the trainer's (its rollout plan)
        model_impl=args.vllm_model_impl,
        trust_remote_code=args.trust_remote_code,
        repetition_penalty=trainer.repetition_penalty,
        temperature=trainer.temperature,
        top_p=trainer.top_p,
        top_k=trainer.top_k,
        min_p=trainer.min_p,
        max_completion_length=trainer.max_completion_length,
        logprobs=0,
        generation_kwargs=args.generation_kwargs,
    )
