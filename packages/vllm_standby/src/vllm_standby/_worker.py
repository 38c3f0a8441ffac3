"""Worker-side operations, run through ``LLM.collective_rpc(fn)`` in each vLLM worker process.

They are plain functions of the worker (vLLM passes it as the first argument), not patches of ``Worker``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

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


def release_kv_cache(worker: Any) -> int:
    """Free the KV cache memory of ``worker`` for real, keeping its tensors (now backed by 0 bytes).

    The per-layer KV tensors vLLM bound to the attention layers and to the model runner are views of a few
    storages; shrinking those storages to 0 bytes returns the memory to the allocator while every view object stays
    in place, so :func:`restore_kv_cache` needs no re-binding. CPU only: on CUDA, CUDA graphs hold the addresses.

    Args:
        worker: The vLLM worker (passed by ``collective_rpc``).

    Returns:
        Bytes released (0 when already released).
    """
    if worker in _RELEASED:
        return 0
    released = [(storage, storage.nbytes()) for storage in _kv_cache_storages(worker)]
    for storage, _ in released:
        storage.resize_(0)
    _RELEASED[worker] = released
    return sum(nbytes for _, nbytes in released)


def restore_kv_cache(worker: Any) -> int:
    """Re-allocate the KV cache released by :func:`release_kv_cache`, zero-filled as vLLM allocates it.

    Args:
        worker: The vLLM worker (passed by ``collective_rpc``).

    Returns:
        Bytes allocated (0 when nothing was released).
    """
    released = _RELEASED.pop(worker, [])
    for storage, nbytes in released:
        storage.resize_(nbytes)
        # resize_ leaves the new bytes uninitialised; vLLM's allocator starts from torch.zeros.
        torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,)).zero_()
    return sum(nbytes for _, nbytes in released)


def kv_cache_nbytes(worker: Any) -> int:
    """Bytes currently held by the worker's KV cache storages."""
    return sum(storage.nbytes() for storage in _kv_cache_storages(worker))


def model_of(worker: Any) -> torch.nn.Module:
    """The model of ``worker``'s model runner."""
    return worker.model_runner.get_model()


def cuda_kv_cache_nbytes(worker: Any) -> int:
    """Bytes of the worker process's CuMem ``kv_cache`` allocations that are mapped now (CUDA, sleep mode on)."""
    from vllm_standby.kv_sleep_backend import kv_cache_mapped_nbytes

    return kv_cache_mapped_nbytes()
