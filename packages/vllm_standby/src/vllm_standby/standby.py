"""``StandbyLLM``: a ``vllm.LLM`` whose KV cache can be released between rollouts, weights untouched."""

from __future__ import annotations

from typing import Any

from vllm import LLM

from vllm_standby.kv_cache import kv_cache_nbytes, kv_standby_mechanism, release_kv_cache, restore_kv_cache
from vllm_standby.plugin import enable, opt_in_child_processes


class StandbyLLM(LLM):
    """A ``vllm.LLM`` with KV-cache-only standby, for colocating vLLM with a trainer.

    :meth:`standby` releases only the KV cache (weights stay where they are: they may be the trainer's);
    :meth:`resume` brings it back, and any generation resumes automatically. Prefix, multimodal and encoder caches
    are reset on :meth:`standby`, since the cached blocks are gone (and weights or adapters usually change before
    the next rollout). Creating a ``StandbyLLM`` opts in: it calls :func:`vllm_standby.enable` in this process, and
    the engine processes it starts (multiprocessing mode) get ``VLLM_STANDBY=1`` for the length of ``LLM.__init__``
    only (:func:`vllm_standby.plugin.opt_in_child_processes`); this process's environment is as it was afterwards.

    How the KV cache is released is :attr:`kv_standby_mechanism` (:func:`vllm_standby.kv_standby_mechanism`). On
    vLLM's CPU platform its pages go back to the OS and come back zero-filled on resume. On CUDA the engine is built
    with ``enable_sleep_mode=True`` and standby unmaps the KV cache's physical memory, mapping it back at the same
    addresses on resume (CUDA graphs stay valid), through vLLM's own ``release_kv_cache_memory`` where the installed
    vLLM has it and through the patched sleep-mode backend where it does not; weights are never unmapped or copied.

    Args:
        *args: Passed to ``vllm.LLM``.
        fast_start: Start with :func:`vllm_standby.fast_start.fast_start_kwargs` (CUDA graphs only for decode batches
            of up to ``max_num_seqs`` sequences, which must then be given) under
            :func:`vllm_standby.fast_start.startup_gc_guard`. Values passed here win over its settings.
        **kwargs: Passed to ``vllm.LLM``.

    Example:
        >>> llm = StandbyLLM("Qwen/Qwen3-0.6B", enforce_eager=True)  # doctest: +SKIP
        >>> llm.standby()  # doctest: +SKIP
        >>> # ... train ...
        >>> llm.generate(prompts, params)  # resumes first  # doctest: +SKIP
    """

    def __init__(self, *args: Any, fast_start: bool = False, **kwargs: Any) -> None:
        from vllm.platforms import current_platform

        enable()
        if not current_platform.is_cpu():
            # On CUDA the KV cache must live in vLLM's CuMem pool, which sleep mode turns on.
            if kwargs.get("enable_sleep_mode") is False:
                raise ValueError("StandbyLLM on CUDA needs enable_sleep_mode=True (allowed: True or unset)")
            kwargs["enable_sleep_mode"] = True
        self._standby = False
        self._mechanism = kv_standby_mechanism()
        if not fast_start:
            with opt_in_child_processes():
                super().__init__(*args, **kwargs)
            return
        from vllm_standby.fast_start import fast_start_kwargs, startup_gc_guard

        kwargs = fast_start_kwargs(**kwargs)
        with startup_gc_guard(), opt_in_child_processes():
            super().__init__(*args, **kwargs)

    @property
    def kv_standby_mechanism(self) -> str | None:
        """How :meth:`standby` releases the KV cache: ``"cpu-worker"``, ``"vllm-api"``, ``"sleep-backend-patch"``, or
        ``None`` where it is not implemented (:meth:`standby` raises ``NotImplementedError`` then)."""
        return self._mechanism

    @property
    def is_standby(self) -> bool:
        """Whether the KV cache is released."""
        return self._standby

    def standby(self) -> int:
        """Release the KV cache; weights, adapters and the engine stay. No-op when already in standby.

        Returns:
            Bytes released across workers (0 when already in standby).

        Raises:
            RuntimeError: requests are still unfinished.
            NotImplementedError: not implemented on this platform / vLLM version.
        """
        if self._standby:
            return 0
        released = release_kv_cache(self)
        self._standby = True
        return released

    def resume(self) -> int:
        """Re-allocate the KV cache released by :meth:`standby`. No-op when not in standby.

        Returns:
            Bytes re-allocated across workers.
        """
        if not self._standby:
            return 0
        restored = restore_kv_cache(self)
        self._standby = False
        return restored

    def kv_cache_nbytes(self) -> int:
        """Bytes held by the KV cache across workers now (0 in standby)."""
        return kv_cache_nbytes(self)

    # Every offline request (generate, chat, encode, beam search, enqueue) enters through _add_request and runs
    # through _run_engine (vllm/entrypoints/offline_utils.py, v0.31.0); resume before either touches the KV cache.
    def _add_request(self, *args: Any, **kwargs: Any) -> str:
        self.resume()
        return super()._add_request(*args, **kwargs)

    def _run_engine(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.resume()
        return super()._run_engine(*args, **kwargs)
