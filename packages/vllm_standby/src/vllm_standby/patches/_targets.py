"""The three patch targets and their replacements, shared by the version-range modules.

Each function returns the :class:`~vllm_standby.patching.PatchSpec` of one target; a range module passes what differs
between its vLLM releases (the pinned source hashes, the LoRA loader's mapper and checks). What each patch does and
why is in the index of the range modules (:mod:`vllm_standby.patches`). Nothing here imports vLLM at import time.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_standby._lora_loader import in_memory_adapter_loader
from vllm_standby.patching import PatchSpec

#: The target of the KV-only sleep-mode backend patch: a range module whose ``PATCHES`` hold it gives CUDA KV standby
#: through vLLM's sleep mode (:func:`vllm_standby.kv_standby_mechanism` ``"sleep-backend-patch"``).
KV_SLEEP_BACKEND_TARGET = ("vllm.device_allocator.sleep_mode_backend", "SleepModeBackendFactory.create_backend")


def _keep_plain_cpu_weights(original: Any) -> Any:
    import torch

    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2 and not weight.is_meta:
            # Same math as vLLM's own fallback path, on the unmodified parameter: `weight` keeps its
            # `weight_loader` and its storage, so load_weights() and aliasing keep working.
            layer.cpu_linear = torch.nn.functional.linear
            return
        original(layer, remove_weight)

    dispatch_cpu_unquantized_gemm.__vllm_standby__ = True
    return dispatch_cpu_unquantized_gemm


def cpu_plain_weights(source_sha256: dict[str, str], upstream: str) -> PatchSpec:
    """``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` (CPU platform): keep 2-D weights plain."""
    return PatchSpec(
        module="vllm.model_executor.layers.utils",
        attribute="dispatch_cpu_unquantized_gemm",
        make_replacement=_keep_plain_cpu_weights,
        reason="keep plain 2-D CPU weights (no repack, no removal) so in-place weight updates and aliasing work",
        remove_when="vLLM keeps the unpacked weight on CPU, or re-packs it in load_weights",
        upstream=upstream,
        signature="(layer: torch.nn.modules.module.Module, remove_weight: bool) -> None",
        source_sha256=source_sha256,
        platform="cpu",
    )


def in_memory_lora(
    source_sha256: dict[str, str], upstream: str, *, mapper: str, validators: tuple[str, ...] = ()
) -> PatchSpec:
    """``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter`` (all platforms): in-memory LoRA adapters.

    Args:
        source_sha256: Pinned source hashes per vLLM release.
        upstream: Upstream file reference.
        mapper: See :func:`vllm_standby._lora_loader.in_memory_adapter_loader`.
        validators: See :func:`vllm_standby._lora_loader.in_memory_adapter_loader`.
    """
    return PatchSpec(
        module="vllm.lora.worker_manager",
        attribute="WorkerLoRAManager._load_adapter",
        make_replacement=functools.partial(in_memory_adapter_loader, mapper=mapper, validators=validators),
        reason="load vllm-standby:// LoRA adapters from in-memory tensors instead of a directory",
        remove_when="vLLM accepts in-memory adapter tensors in LoRARequest",
        upstream=upstream,
        signature="(self, lora_request: vllm.lora.request.LoRARequest) -> vllm.lora.lora_model.LoRAModel",
        source_sha256=source_sha256,
    )


def _kv_only_backend_when_enabled(original: Any) -> Any:
    def create_backend(cls, model_config):
        from vllm_standby.plugin import is_enabled

        if is_enabled() and model_config.sleep_mode_backend == "cumem":
            from vllm_standby.kv_sleep_backend import KVOnlySleepBackend

            return KVOnlySleepBackend()
        return original(model_config)

    create_backend.__wrapped__ = getattr(original, "__func__", original)
    create_backend.__vllm_standby__ = True
    return classmethod(create_backend)


def kv_only_sleep_backend(source_sha256: dict[str, str], upstream: str) -> PatchSpec:
    """``SleepModeBackendFactory.create_backend`` (CUDA): the KV-only sleep-mode backend while standby is on."""
    module, attribute = KV_SLEEP_BACKEND_TARGET
    return PatchSpec(
        module=module,
        attribute=attribute,
        make_replacement=_kv_only_backend_when_enabled,
        reason="with standby on, LLM.sleep releases only the KV cache (weights stay mapped)",
        remove_when="vLLM has its own KV-only release (LLM.release_kv_cache_memory, from 0.31)",
        upstream=upstream,
        signature="(model_config: 'ModelConfig') -> 'SleepModeBackend'",
        source_sha256=source_sha256,
        platform="cuda",
    )
