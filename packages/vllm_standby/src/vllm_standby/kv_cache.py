"""KV-cache-only standby for any ``vllm.LLM`` instance (including one a trainer built): release and restore.

:class:`vllm_standby.StandbyLLM` wraps these with automatic resume; a trainer that receives an ``LLM`` it did not
create (TRL's colocate mode) calls them around each rollout.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_standby import _worker

logger = logging.getLogger(__name__)


def kv_standby_supported() -> bool:
    """Whether KV-only standby is implemented on vLLM's current platform (the CPU platform in 0.1.0)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def release_kv_cache(llm: Any) -> int:
    """Release the KV cache of every worker of ``llm``; weights, adapters and the engine stay.

    Prefix, multimodal and encoder caches are reset first: the blocks they point to are about to be freed.

    Args:
        llm: A ``vllm.LLM`` with no unfinished requests.

    Returns:
        Bytes released across workers (0 when already released).

    Raises:
        NotImplementedError: Not on vLLM's CPU platform.
        RuntimeError: Requests are unfinished, or vLLM refused to reset its prefix cache.
    """
    if not kv_standby_supported():
        raise NotImplementedError(
            "KV-only standby is implemented for vLLM's CPU platform only in vllm-standby 0.1.0; "
            "on CUDA use LLM(enable_sleep_mode=True) with sleep/wake_up for now"
        )
    if llm.llm_engine.has_unfinished_requests():
        raise RuntimeError("release_kv_cache: requests are unfinished; finish or abort them first")
    if not llm.reset_prefix_cache():
        raise RuntimeError("release_kv_cache: vLLM refused to reset the prefix cache")
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()
    released = sum(llm.collective_rpc(_worker.release_kv_cache))
    logger.info("vllm_standby: KV cache released (%d bytes)", released)
    return released


def restore_kv_cache(llm: Any) -> int:
    """Re-allocate the KV cache released by :func:`release_kv_cache` (0 bytes when nothing was released)."""
    restored = sum(llm.collective_rpc(_worker.restore_kv_cache))
    if restored:
        logger.info("vllm_standby: KV cache restored (%d bytes)", restored)
    return restored


def kv_cache_nbytes(llm: Any) -> int:
    """Bytes held by ``llm``'s KV cache across workers now (0 while released)."""
    return sum(llm.collective_rpc(_worker.kv_cache_nbytes))
