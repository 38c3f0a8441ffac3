"""Patches for vLLM 0.25 to 0.28 (the CUDA build on the GPU image).

Index (each entry: target, reason, upstream, when to remove):

1. ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter`` (all platforms).
   Reason: ``LoRARequest`` carries only a path, and the original reads ``adapter_config.json`` and the weights from
   disk. For a ``vllm-standby://`` path (see :func:`vllm_standby.lora_request`) the replacement builds the
   ``LoRAModel`` from registered in-memory tensors with vLLM's own ``LoRAModel.from_lora_tensors`` and
   ``PEFTHelper.from_dict`` (same validation), on the tensors' device: no host round trip for a CUDA adapter. Any
   other path goes to the original. 0.25 renames with ``get_unstacked_mapper`` and has no head validation.
   Upstream: ``vllm/lora/worker_manager.py`` at v0.25.0.
   Remove when: vLLM accepts in-memory adapter tensors in ``LoRARequest``.

2. ``vllm.device_allocator.sleep_mode_backend.SleepModeBackendFactory.create_backend`` (CUDA only).
   Reason: the sleep-mode backend is chosen by ``ModelConfig.sleep_mode_backend`` (default ``"cumem"``), which
   ``LLM(...)`` cannot set (no engine argument in 0.25). With standby on (:func:`vllm_standby.enable`,
   ``VLLM_STANDBY=1`` or a :class:`vllm_standby.StandbyLLM`), the replacement returns
   :class:`vllm_standby.kv_sleep_backend.KVOnlySleepBackend` for ``"cumem"``, so ``LLM.sleep`` releases only the KV
   cache and weights stay mapped; with standby off, or another backend named, the original runs.
   Upstream: ``vllm/device_allocator/sleep_mode_backend.py`` at v0.25.0 (RFC vllm-project/vllm#34303).
   Remove when: ``sleep_mode_backend`` is an engine argument (then pass it), or vLLM has a KV-only sleep level.
"""

from __future__ import annotations

from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_standby._lora_loader import in_memory_adapter_loader
from vllm_standby.patching import PatchSpec

VLLM_RANGE = SpecifierSet(">=0.25,<0.29")

#: KV-only standby on CUDA goes through vLLM's sleep-mode backend (patch 2) in this range.
CUDA_KV_STANDBY = True


def _load_in_memory_adapters(original: Any) -> Any:
    return in_memory_adapter_loader(original, mapper="get_unstacked_mapper", validate_heads=False)


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


PATCHES: tuple[PatchSpec, ...] = (
    PatchSpec(
        module="vllm.lora.worker_manager",
        attribute="WorkerLoRAManager._load_adapter",
        make_replacement=_load_in_memory_adapters,
        reason="load vllm-standby:// LoRA adapters from in-memory tensors instead of a directory",
        remove_when="vLLM accepts in-memory adapter tensors in LoRARequest",
        upstream="vllm/lora/worker_manager.py (v0.25.0)",
        signature="(self, lora_request: vllm.lora.request.LoRARequest) -> vllm.lora.lora_model.LoRAModel",
        source_sha256={"0.25.0": "591a4449e2e6472abec00f6620784efeaf0a3637d5dfe1a605b3ffaca394e63d"},
    ),
    PatchSpec(
        module="vllm.device_allocator.sleep_mode_backend",
        attribute="SleepModeBackendFactory.create_backend",
        make_replacement=_kv_only_backend_when_enabled,
        reason="with standby on, LLM.sleep releases only the KV cache (weights stay mapped)",
        remove_when="sleep_mode_backend is an engine argument, or vLLM has a KV-only sleep level",
        upstream="vllm/device_allocator/sleep_mode_backend.py (v0.25.0), RFC vllm-project/vllm#34303",
        signature="(model_config: 'ModelConfig') -> 'SleepModeBackend'",
        source_sha256={"0.25.0": "9d5ecb263715381f581c88f842db4173960412613702c364ca65ccfe842361a7"},
        platform="cuda",
    ),
)
