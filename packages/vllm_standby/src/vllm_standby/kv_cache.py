"""KV-cache-only standby for any ``vllm.LLM`` instance (including one a trainer built): release and restore.

:class:`vllm_standby.StandbyLLM` wraps these with automatic resume; a trainer that receives an ``LLM`` it did not
create (TRL's colocate mode) calls them around each rollout.

Three mechanisms, one API; :func:`kv_standby_mechanism` says which one the installed vLLM gets:

- ``"cpu-worker"``, vLLM's CPU platform (which refuses sleep mode, and whose worker cannot discard memory): the KV
  cache's pages go back to the OS and come back zero-filled (:mod:`vllm_standby._worker`).
- ``"vllm-api"``, CUDA with a vLLM that has its own KV-only release (``LLM.release_kv_cache_memory``, from 0.31):
  ``LLM.sleep(level=0)`` pauses scheduling, ``release_kv_cache_memory()`` unmaps the KV cache's physical memory,
  ``wake_up(tags=["kv_cache"])`` maps it back at the same addresses and ``wake_up(tags=["scheduling"])`` resumes.
- ``"sleep-backend-patch"``, CUDA with a vLLM without it (0.25-0.30): ``LLM.sleep`` / ``LLM.wake_up`` with the engine
  built while standby is on, so vLLM's sleep-mode backend is :class:`vllm_standby.kv_sleep_backend.KVOnlySleepBackend`
  (patched in by the range module): the same unmapping, of the KV cache only.

Both CUDA mechanisms need the engine built with ``enable_sleep_mode=True`` (its KV cache in vLLM's CuMem pool); weights
never move.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_standby import _worker

logger = logging.getLogger(__name__)

#: What :func:`kv_standby_mechanism` returns where KV-only standby is implemented.
MECHANISMS = ("cpu-worker", "vllm-api", "sleep-backend-patch")


def kv_standby_mechanism() -> str | None:
    """How KV-only standby works with the installed vLLM on its current platform, or ``None`` where it does not.

    Returns:
        ``"cpu-worker"`` on vLLM's CPU platform; on CUDA ``"vllm-api"`` when ``vllm.LLM`` has
        ``release_kv_cache_memory`` (detected, not read from the version), else ``"sleep-backend-patch"`` when the
        installed vLLM's patch module provides the KV-only sleep backend; ``None`` otherwise (other platforms, or a
        CUDA vLLM with neither).

    Example:
        >>> vllm_standby.kv_standby_mechanism()  # doctest: +SKIP
        'cpu-worker'
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu-worker"
    if not current_platform.is_cuda():
        return None
    from vllm import LLM

    if callable(getattr(LLM, "release_kv_cache_memory", None)):
        return "vllm-api"
    from vllm_standby import patches
    from vllm_standby._version import installed_vllm_version

    if patches.provides_kv_sleep_backend(patches.module_for(installed_vllm_version())):
        return "sleep-backend-patch"
    return None


def kv_standby_supported() -> bool:
    """Whether KV-only standby is implemented for the installed vLLM on its current platform
    (:func:`kv_standby_mechanism` is not ``None``)."""
    return kv_standby_mechanism() is not None


def _mechanism_for(llm: Any) -> str:
    """The mechanism for ``llm``, after checking that its engine can use it."""
    mechanism = kv_standby_mechanism()
    if mechanism is None:
        from vllm.platforms import current_platform

        raise NotImplementedError(
            f"KV-only standby is not implemented by vllm_standby for vLLM on {current_platform.device_type!r} "
            f"(implemented: {', '.join(MECHANISMS)}; see vllm_standby.kv_standby_mechanism())"
        )
    if mechanism == "cpu-worker":
        return mechanism
    if not llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
        raise RuntimeError(
            "KV-only standby on CUDA needs the LLM built with enable_sleep_mode=True (its KV cache must live in "
            "vLLM's CuMem pool); vllm_standby.StandbyLLM does this for you"
        )
    if mechanism == "sleep-backend-patch":
        from vllm_standby.plugin import is_active

        is_active()  # raises, saying how to opt in: without the patch LLM.sleep would unmap the weights too
    return mechanism


def abort_unfinished_requests(llm: Any) -> int:
    """Abort every request ``llm``'s engine has not finished, through the engine's own abort API.

    For a trainer after vLLM failed mid-rollout: the requests it left would hold KV blocks, and
    :func:`release_kv_cache` refuses to run while any is unfinished. The front end's request states
    (``llm.llm_engine.output_processor.request_states``, keyed by the engine's internal request id, in every vLLM this
    package supports) list them; ``LLMEngine.abort_request(ids, internal=True)`` removes them from the front end and
    the engine core. Parents of parallel-sampling requests are aborted with them.

    Args:
        llm: A ``vllm.LLM``.

    Returns:
        How many requests (sequences, one per parallel-sampling child) were aborted; 0 when none was unfinished.

    Example:
        >>> vllm_standby.abort_unfinished_requests(llm)  # doctest: +SKIP
        2
    """
    engine = llm.llm_engine
    processor = engine.output_processor
    unfinished = list(processor.request_states)
    parents = [rid for rid in getattr(processor, "parent_requests", {}) if rid not in processor.request_states]
    if unfinished or parents:
        # Children first: aborting a parent id afterwards only drops its record (its children are gone already).
        engine.abort_request([*unfinished, *parents], internal=True)
        logger.warning("vllm_standby: aborted %d unfinished vLLM request(s)", len(unfinished))
    return len(unfinished)


def release_kv_cache(llm: Any, *, abort_unfinished: bool = False) -> int:
    """Release the KV cache of every worker of ``llm``; weights, adapters and the engine stay.

    Prefix, multimodal and encoder caches are reset first: the blocks they point to are about to be freed.

    Args:
        llm: A ``vllm.LLM`` (on CUDA: built with ``enable_sleep_mode=True``, and for ``"sleep-backend-patch"`` while
            standby was on, as :class:`vllm_standby.StandbyLLM` does).
        abort_unfinished: Abort unfinished requests first (:func:`abort_unfinished_requests`), e.g. after vLLM
            failed mid-rollout; by default unfinished requests are refused.

    Returns:
        Bytes released across workers (0 when already released).

    Raises:
        NotImplementedError: Not implemented on this platform / vLLM version.
        RuntimeError: Requests are unfinished (and ``abort_unfinished`` is false), vLLM refused to reset its prefix
            cache, or (CUDA) the engine was not built for standby.
    """
    if abort_unfinished:
        abort_unfinished_requests(llm)
    if llm.llm_engine.has_unfinished_requests():
        raise RuntimeError(
            "release_kv_cache: requests are unfinished; finish them, or pass abort_unfinished=True to abort them"
        )
    mechanism = _mechanism_for(llm)
    if mechanism == "cpu-worker":
        if not llm.reset_prefix_cache():
            raise RuntimeError("release_kv_cache: vLLM refused to reset the prefix cache")
        llm.reset_mm_cache()
        llm.llm_engine.reset_encoder_cache()
        released = sum(llm.collective_rpc(_worker.release_kv_cache))
        logger.info("vllm_standby: KV cache released (%d bytes)", released)
        return released
    if llm.llm_engine.is_sleeping():
        return 0
    held = kv_cache_nbytes(llm)
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()
    if mechanism == "sleep-backend-patch":
        llm.sleep(level=1)  # resets the prefix cache; the KV-only backend unmaps the KV cache only
        return held
    _pause_for_release(llm)
    try:
        llm.release_kv_cache_memory()  # resets the prefix cache, then unmaps the KV cache's memory
    except BaseException:
        _resume_after_failed_release(llm)
        raise
    logger.info("vllm_standby: KV cache released through vLLM (%d bytes)", held)
    return held


# Empty steps an in-process engine core may need to go idle: one hands over the finished requests' ids, one more per
# batch still in its batch queue (async scheduling keeps up to two batches in flight).
_DRAIN_STEPS = 8


def _pause_for_release(llm: Any) -> None:
    """Pause scheduling with nothing left in the engine core, as ``LLM.release_kv_cache_memory`` requires."""
    if type(llm.llm_engine.engine_core).__name__ == "InprocClient":
        drain_inproc_engine_core(llm)
    llm.sleep(level=0)  # nothing is unfinished, so the pause aborts nothing


def drain_inproc_engine_core(llm: Any, max_steps: int = _DRAIN_STEPS) -> int:
    """Step an in-process engine core with no unfinished request until it holds nothing: no finished request's id
    still to hand to the workers and no batch in its batch queue.

    ``LLM.release_kv_cache_memory`` refuses ("requires a completed pause first") while the core holds either. A
    multiprocessing engine core's own loop steps until idle by itself; an in-process one steps only when called.

    Returns:
        The number of steps taken.

    Raises:
        RuntimeError: The core still holds work after ``max_steps`` steps.
    """
    core = llm.llm_engine.engine_core.engine_core
    for taken in range(max_steps + 1):
        if not core.scheduler.has_requests() and not core.batch_queue:
            return taken
        if taken < max_steps:
            llm.llm_engine.step()
    raise RuntimeError(
        f"vllm_standby: vLLM's engine core still holds requests or queued batches after {max_steps} empty steps "
        f"(finished or unfinished requests: {core.scheduler.has_requests()}, batches queued: "
        f"{len(core.batch_queue or ())}); the KV cache stays in place"
    )


def _resume_after_failed_release(llm: Any) -> None:
    """Leave the engine running after ``release_kv_cache_memory`` failed: vLLM marks the KV cache asleep even when
    the discard raised, and the scheduler stays paused until the KV cache is awake again."""
    try:
        llm.wake_up(tags=["kv_cache", "scheduling"])
    except Exception as exc:
        logger.error(
            "vllm_standby: after the failed KV cache release the engine could not be resumed (%s: %s); call "
            "llm.wake_up() before generating",
            type(exc).__name__, exc,
        )  # fmt: skip


def restore_kv_cache(llm: Any) -> int:
    """Bring back the KV cache released by :func:`release_kv_cache` (0 bytes when nothing was released).

    Returns:
        Bytes of KV cache usable again across workers.

    Raises:
        RuntimeError: (CUDA) mapping the KV cache back ran out of GPU memory (the message says what to free), or the
            engine is still asleep afterwards (its weights were put to sleep by a ``LLM.sleep(level>=1)`` of vLLM's
            own backend: call ``llm.wake_up()``).
    """
    mechanism = _mechanism_for(llm)
    if mechanism == "cpu-worker":
        restored = sum(llm.collective_rpc(_worker.restore_kv_cache))
        if restored:
            logger.info("vllm_standby: KV cache restored (%d bytes)", restored)
        return restored
    if not llm.llm_engine.is_sleeping():
        return 0
    import torch

    torch.cuda.empty_cache()  # a colocated trainer's cached blocks must go back to the driver first
    free = torch.cuda.mem_get_info()[0]
    try:
        llm.wake_up(tags=["kv_cache"] if mechanism == "vllm-api" else None)
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        raise RuntimeError(
            f"restoring vLLM's KV cache ran out of GPU memory ({free / 2**30:.2f} GiB free before): what stays "
            "allocated outside vLLM while it generates (a trainer's weights, optimizer states, cached tensors) "
            "must fit beside its KV cache. Lower gpu_memory_utilization, or free that memory before resuming."
        ) from exc
    if mechanism == "vllm-api":
        llm.wake_up(tags=["scheduling"])
    if llm.llm_engine.is_sleeping():
        raise RuntimeError(
            "restore_kv_cache: the KV cache is back but the engine is still asleep (its weights were put to sleep "
            "by LLM.sleep(level>=1)); call llm.wake_up() before generating"
        )
    return kv_cache_nbytes(llm)


def kv_cache_nbytes(llm: Any) -> int:
    """Bytes held by ``llm``'s KV cache across workers now (0 while released)."""
    fn = _worker.kv_cache_nbytes if kv_standby_mechanism() == "cpu-worker" else _worker.cuda_kv_cache_nbytes
    return sum(llm.collective_rpc(fn))
