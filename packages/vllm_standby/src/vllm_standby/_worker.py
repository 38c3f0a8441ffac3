"""Worker-side operations, run through ``LLM.collective_rpc(fn)`` in each vLLM worker process.

They are plain functions of the worker (vLLM passes it as the first argument), not patches of ``Worker``.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import weakref
from typing import Any

import torch

_MADV_DONTNEED = 4
#: The tag of the KV cache's allocations in vLLM's CuMem pool.
KV_CACHE_TAG = "kv_cache"
# libc's madvise where its semantics are known (Linux: private anonymous pages come back zero-filled).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

# worker -> storages of its KV cache released by release_kv_cache(), with their sizes in bytes.
_RELEASED: weakref.WeakKeyDictionary[Any, list[tuple[torch.UntypedStorage, int]]] = weakref.WeakKeyDictionary()


def _kv_cache_storages(worker: Any) -> list[torch.UntypedStorage]:
    """Distinct storages behind the worker's KV cache tensors (one per backing allocation in vLLM 0.31)."""
    runner = worker.model_runner
    tensors: list[torch.Tensor] = [t for t in runner.kv_caches if isinstance(t, torch.Tensor)]
    for layer in runner.compilation_config.static_forward_context.values():
        cache = getattr(layer, "kv_cache", None)
        if isinstance(cache, torch.Tensor):
            tensors.append(cache)
    storages: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() > 0:
            storages.setdefault(storage.data_ptr(), storage)
    return list(storages.values())


def zero_storage(storage: torch.UntypedStorage) -> None:
    """Write zeros over every byte of ``storage`` (on its device)."""
    torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),)).zero_()


def _page_range(storage: torch.UntypedStorage) -> tuple[int, int]:
    """Start address and length of the whole pages inside ``storage`` (its unaligned edges excluded)."""
    page = mmap.PAGESIZE
    start = -(-storage.data_ptr() // page) * page
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    return start, max(0, end - start)


def _discard_pages(storage: torch.UntypedStorage) -> None:
    """Give the storage's physical pages back to the OS, keeping its addresses (Linux ``MADV_DONTNEED``).

    The range stays mapped: the next touch of a page maps a fresh zero page, so the KV cache comes back lazily,
    zero-filled, and only where vLLM writes. The unaligned edges (under one page each) keep their old values.
    """
    start, length = _page_range(storage)
    if length and _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), f"madvise(MADV_DONTNEED) failed on the KV cache ({length} bytes)")
    if length and ctypes.c_uint64.from_address(start).value != 0:
        # Not private anonymous memory (e.g. shared): the pages kept their data. Zero them the slow way.
        zero_storage(storage)


def release_kv_cache(worker: Any) -> int:
    """Free the KV cache memory of ``worker`` for real, keeping its tensors and their addresses.

    The per-layer KV tensors vLLM bound to the attention layers and to the model runner are views of a few
    storages. Their physical pages go back to the OS (``MADV_DONTNEED``) while every view and address stays, so
    :func:`restore_kv_cache` has nothing to re-bind or re-allocate: pages come back zero-filled on first touch, and
    only those vLLM writes (a rollout that uses a small part of the cache costs only that part). Elsewhere than Linux
    the storages are shrunk to 0 bytes and re-allocated zero-filled instead. CPU only: on CUDA vLLM's sleep
    mode does it (:mod:`vllm_standby.kv_cache`).

    Args:
        worker: The vLLM worker (passed by ``collective_rpc``).

    Returns:
        Bytes released (0 when already released).
    """
    if worker in _RELEASED:
        return 0
    released = [(storage, storage.nbytes()) for storage in _kv_cache_storages(worker)]
    for storage, _ in released:
        if _LIBC is not None:
            _discard_pages(storage)
        else:
            storage.resize_(0)
    _RELEASED[worker] = released
    return sum(nbytes for _, nbytes in released)


def restore_kv_cache(worker: Any) -> int:
    """Bring back the KV cache released by :func:`release_kv_cache`, zero-filled as vLLM allocates it.

    On Linux nothing is allocated here: the released pages fault back in, zero-filled, when vLLM writes them.

    Args:
        worker: The vLLM worker (passed by ``collective_rpc``).

    Returns:
        Bytes of KV cache usable again (0 when nothing was released).
    """
    released = _RELEASED.pop(worker, [])
    if _LIBC is None:
        for storage, nbytes in released:
            storage.resize_(nbytes)
            zero_storage(storage)  # resize_ leaves the new bytes uninitialised; vLLM starts from torch.zeros
    return sum(nbytes for _, nbytes in released)


def kv_cache_nbytes(worker: Any) -> int:
    """Bytes currently usable by the worker's KV cache (0 while released)."""
    if worker in _RELEASED:
        return 0
    return sum(storage.nbytes() for storage in _kv_cache_storages(worker))


def model_of(worker: Any) -> torch.nn.Module:
    """The model of ``worker``'s model runner."""
    return worker.model_runner.get_model()


def cuda_kv_cache_nbytes(worker: Any) -> int:
    """Bytes of the worker's KV cache that are physically mapped now (CUDA, sleep mode on).

    The KV cache lives in vLLM's CuMem pool (allocations tagged ``kv_cache``), or, from vLLM 0.34, in the model
    runner's extensible KV cache, which vLLM maps outside that pool; both are counted.
    """
    from vllm.device_allocator import get_mem_allocator_instance

    pool = get_mem_allocator_instance().pointer_to_data.values()
    mapped = sum(d.handle[1] for d in pool if d.tag == KV_CACHE_TAG and not d.is_asleep)
    extensible = getattr(worker.model_runner, "extensible_kv_cache", None)
    if extensible is not None:
        mapped += extensible.physical_bytes
    return mapped
