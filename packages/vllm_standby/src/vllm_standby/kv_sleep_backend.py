"""A vLLM sleep-mode backend that releases only the KV cache: weights stay mapped, where they are (CUDA, vLLM 0.25-0.30).

vLLM (0.25+) routes ``LLM.sleep`` / ``LLM.wake_up`` through a sleep-mode backend (``SleepModeBackendFactory``,
``vllm/device_allocator/sleep_mode_backend.py``). Its default, ``CuMemBackend``, unmaps every allocation of the CuMem
pool and copies the weights to host memory (level 1) or drops them (level 2). This one unmaps only the allocations
tagged ``kv_cache``, at any level, and maps them back at the same virtual addresses on wake-up, so CUDA graphs that
captured those addresses stay valid. Weights are never unmapped or copied: they may be a trainer's tensors
(:func:`vllm_standby.shared_hf_model`). The sleep-backend patch of :mod:`vllm_standby.patches.vllm_0_25` and
:mod:`vllm_standby.patches.vllm_0_29` selects it when standby is on; from 0.31 vLLM's own
``LLM.release_kv_cache_memory`` does the same and this backend is not used.

This module imports vLLM; it is imported only by that patch, in the process that owns the GPU memory.
"""

from __future__ import annotations

import logging

import torch
from vllm.device_allocator import get_mem_allocator_instance
from vllm.device_allocator.sleep_mode_backend import SleepModeBackend

from vllm_standby._worker import KV_CACHE_TAG

logger = logging.getLogger(__name__)


class KVOnlySleepBackend(SleepModeBackend):
    """Sleep-mode backend: ``suspend`` unmaps the ``kv_cache`` allocations only; ``resume`` maps them back."""

    def suspend(self, level: int = 1) -> None:
        """Release the physical memory of the KV cache (any ``level``: weights are never touched)."""
        from vllm.device_allocator.cumem import unmap_and_release

        self._state = "SUSPENDED"
        released = 0
        for data in get_mem_allocator_instance().pointer_to_data.values():
            if data.tag == KV_CACHE_TAG and not data.is_asleep:
                unmap_and_release(data.handle)
                data.is_asleep = True
                released += data.handle[1]
        # No gc.collect(): nothing Python-side was freed, and a full collection costs seconds in a trainer process.
        torch.cuda.empty_cache()
        logger.info("vllm_standby: KV cache released (%.2f GiB); weights stay mapped", released / 2**30)

    def resume(self, tags: list[str] | None = None) -> None:
        """Map back the released allocations among ``tags`` (all when ``None``) at their old addresses."""
        from vllm.device_allocator.cumem import create_and_map

        self._state = "RESUMING"
        restored = 0
        for data in get_mem_allocator_instance().pointer_to_data.values():
            if data.is_asleep and (tags is None or data.tag in tags):
                create_and_map(data.handle)
                data.is_asleep = False
                restored += data.handle[1]
        self._state = "RUNNING"
        logger.info("vllm_standby: KV cache restored (%.2f GiB)", restored / 2**30)

    @classmethod
    def preserves_communicators(cls) -> bool:
        return True

    @classmethod
    def preserves_compiled_artifacts(cls) -> bool:
        return True
