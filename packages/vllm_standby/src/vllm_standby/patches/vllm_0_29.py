"""Patches for vLLM 0.29 and 0.30 (CUDA; no CPU build of these is supported).

Index (each entry: target, reason, upstream, when to remove, what was verified):

1. ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter`` (all platforms): in-memory LoRA adapters, as in
   :mod:`vllm_standby.patches.vllm_0_25`. From 0.29 vLLM renames with ``get_rename_mapper`` (it ignores stacking);
   it still checks nothing on the loaded adapter.
   Upstream: ``vllm/lora/worker_manager.py`` at v0.29.0.
   Remove when: vLLM accepts in-memory adapter tensors in ``LoRARequest``.
   Verified: one source hash for 0.29.0 and 0.30.0; the attributes the replacement reads and ``from_lora_tensors``
   are unchanged from 0.25.

2. ``vllm.device_allocator.sleep_mode_backend.SleepModeBackendFactory.create_backend`` (CUDA only): the KV-only
   sleep-mode backend while standby is on, as in :mod:`vllm_standby.patches.vllm_0_25` (no KV-only release in vLLM
   before 0.31).
   Upstream: ``vllm/device_allocator/sleep_mode_backend.py`` at v0.29.0.
   Remove when: this range is dropped.
   Verified: the factory's source is the same as in 0.25 (one hash). 0.29 still resolves the backend through
   ``Worker._get_sleep_mode_backend``; 0.30 turns it into the lazily set property ``Worker.sleep_mode_backend``, which
   calls the same factory. ``SleepModeBackend`` keeps the ``suspend`` / ``resume`` interface
   :class:`~vllm_standby.kv_sleep_backend.KVOnlySleepBackend` implements. Not GPU-tested (the GPU image has 0.25).
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from vllm_standby.patches._targets import in_memory_lora, kv_only_sleep_backend

VLLM_RANGE = SpecifierSet(">=0.29,<0.31")

_LOAD_ADAPTER = "e3cde0994812895db097c3f661c9663787d530939e54831c611c7ebabd5b2f9a"
_CREATE_BACKEND = "9d5ecb263715381f581c88f842db4173960412613702c364ca65ccfe842361a7"
_RELEASES = ("0.29.0", "0.30.0")

PATCHES = (
    in_memory_lora(
        dict.fromkeys(_RELEASES, _LOAD_ADAPTER), "vllm/lora/worker_manager.py (v0.29.0)", mapper="get_rename_mapper"
    ),
    kv_only_sleep_backend(
        dict.fromkeys(_RELEASES, _CREATE_BACKEND), "vllm/device_allocator/sleep_mode_backend.py (v0.29.0)"
    ),
)
