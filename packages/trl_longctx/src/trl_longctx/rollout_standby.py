"""vLLM's KV cache live for the length of one rollout, released again after it, also when the rollout fails."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def kv_cache_for_rollout(llm: Any) -> Iterator[None]:
    """Restore `llm`'s KV cache on entry and release it on exit (`vllm_standby.restore_kv_cache` / `release_kv_cache`).

    When the rollout raises, vLLM may hold requests it did not finish: they are aborted first, so the KV cache is
    released and the run can checkpoint or go on; the rollout's own error is what propagates. A failure of that
    clean-up is logged with the engine state it leaves, never raised over the rollout's error.
    """
    from vllm_standby import release_kv_cache, restore_kv_cache

    restore_kv_cache(llm)
    try:
        yield
    except BaseException:
        try:
            release_kv_cache(llm, abort_unfinished=True)
        except Exception as cleanup_error:
            logger.error(
                "After the failed rollout, vLLM's KV cache could not be released (%s: %s); it stays allocated.",
                type(cleanup_error).__name__, cleanup_error,
            )  # fmt: skip
        raise
    release_kv_cache(llm)
