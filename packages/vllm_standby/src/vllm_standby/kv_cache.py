"""KV-cache-only standby for any ``vllm.LLM`` instance (including one a trainer built): release and restore.

:class:`vllm_standby.StandbyLLM` wraps these with automatic resume; a trainer that receives an ``LLM`` it did not
create (TRL's colocate mode) calls them around each rollout.

Two mechanisms, one API:

- vLLM's CPU platform (which refuses sleep mode): the KV cache storages are shrunk to 0 bytes and re-allocated
  zero-filled (:mod:`vllm_standby._worker`).
- CUDA (vLLM 0.25-0.28): ``LLM.sleep`` / ``LLM.wake_up`` with the engine built with ``enable_sleep_mode=True`` and
  standby on, so vLLM's sleep-mode backend is :class:`vllm_standby.kv_sleep_backend.KVOnlySleepBackend`: the KV
  cache's physical memory is unmapped and mapped back at the same addresses; weights stay.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_standby import _worker

logger = logging.getLogger(__name__)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def kv_standby_supported() -> bool:
    """Whether KV-only standby is implemented on vLLM's current platform and version.

    True on the CPU platform, and on CUDA with vLLM 0.25-0.28 (the sleep-mode backend patch).
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return True
    if not current_platform.is_cuda():
        return False
    from vllm_standby import patches
    from vllm_standby._version import installed_vllm_version

    module = patches.module_for(installed_vllm_version())
    return bool(getattr(module, "CUDA_KV_STANDBY", False))


def _check_cuda_engine(llm: Any) -> None:
    from vllm_standby.plugin import is_active, is_enabled

    if not kv_standby_supported():
        raise NotImplementedError("KV-only standby on this vLLM platform/version is not implemented by vllm_standby")
    if not llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
        raise RuntimeError(
            "KV-only standby on CUDA needs the LLM built with enable_sleep_mode=True (its KV cache must live in "
            "vLLM's CuMem pool); vllm_standby.StandbyLLM does this for you"
        )
    is_active()
    if not is_enabled():
        raise RuntimeError(
            "standby is off: LLM.sleep would unmap the weights too. Call vllm_standby.enable() (or set "
            "VLLM_STANDBY=1) before creating the LLM"
        )


def release_kv_cache(llm: Any) -> int:
    """Release the KV cache of every worker of ``llm``; weights, adapters and the engine stay.

    Prefix, multimodal and encoder caches are reset first: the blocks they point to are about to be freed.

    Args:
        llm: A ``vllm.LLM`` with no unfinished requests (on CUDA: built with ``enable_sleep_mode=True`` while
            standby was on, as :class:`vllm_standby.StandbyLLM` does).

    Returns:
        Bytes released across workers (0 when already released).

    Raises:
        NotImplementedError: Not implemented on this platform / vLLM version.
        RuntimeError: Requests are unfinished, vLLM refused to reset its prefix cache, or (CUDA) the engine was not
            built for standby.
    """
    if llm.llm_engine.has_unfinished_requests():
        raise RuntimeError("release_kv_cache: requests are unfinished; finish or abort them first")
    if not _on_cpu():
        _check_cuda_engine(llm)
        held = kv_cache_nbytes(llm)
        if held:
            llm.reset_mm_cache()
            llm.llm_engine.reset_encoder_cache()
            llm.sleep(level=1)  # resets the prefix cache; the KV-only backend unmaps the KV cache only
        return held
    if not llm.reset_prefix_cache():
        raise RuntimeError("release_kv_cache: vLLM refused to reset the prefix cache")
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()
    released = sum(llm.collective_rpc(_worker.release_kv_cache))
    logger.info("vllm_standby: KV cache released (%d bytes)", released)
    return released


def restore_kv_cache(llm: Any) -> int:
    """Bring back the KV cache released by :func:`release_kv_cache` (0 bytes when nothing was released)."""
    if not _on_cpu():
        if not llm.llm_engine.is_sleeping():
            return 0
        import torch

        torch.cuda.empty_cache()  # a colocated trainer's cached blocks must go back to the driver first
        free = torch.cuda.mem_get_info()[0]
        try:
            llm.wake_up()
        except RuntimeError as exc:
            if "out of memory" not in str(exc):
                raise
            raise RuntimeError(
                f"restoring vLLM's KV cache ran out of GPU memory ({free / 2**30:.2f} GiB free before): what stays "
                "allocated outside vLLM while it generates (a trainer's weights, optimizer states, cached tensors) "
                "must fit beside its KV cache. Lower gpu_memory_utilization, or free that memory before resuming."
            ) from exc
        return kv_cache_nbytes(llm)
    restored = sum(llm.collective_rpc(_worker.restore_kv_cache))
    if restored:
        logger.info("vllm_standby: KV cache restored (%d bytes)", restored)
    return restored


def kv_cache_nbytes(llm: Any) -> int:
    """Bytes held by ``llm``'s KV cache across workers now (0 while released)."""
    fn = _worker.kv_cache_nbytes if _on_cpu() else _worker.cuda_kv_cache_nbytes
    return sum(llm.collective_rpc(fn))
