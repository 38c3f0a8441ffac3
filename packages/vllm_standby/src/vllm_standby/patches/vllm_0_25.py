"""Patches for vLLM 0.25 to 0.28 (0.25 is the CUDA build on the GPU image).

Index (each entry: target, reason, upstream, when to remove, what was verified):

1. ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter`` (all platforms).
   Reason: ``LoRARequest`` carries only a path, and the original reads ``adapter_config.json`` and the weights from
   disk. For a ``vllm-standby://`` path (see :func:`vllm_standby.lora_request`) the replacement builds the
   ``LoRAModel`` from registered in-memory tensors with vLLM's own ``LoRAModel.from_lora_tensors`` and
   ``PEFTHelper.from_dict`` (same validation), on the tensors' device: no host round trip for a CUDA adapter. Any
   other path goes to the original. In this range vLLM renames with ``get_unstacked_mapper`` and checks nothing on
   the loaded adapter.
   Upstream: ``vllm/lora/worker_manager.py`` at v0.25.0.
   Remove when: vLLM accepts in-memory adapter tensors in ``LoRARequest``.
   Verified: the source is the same in 0.25.0, 0.26.0, 0.27.0 and 0.28.0 (one hash); ``from_lora_tensors``,
   ``PEFTHelper.from_dict`` / ``validate_legal`` and the manager attributes the replacement reads
   (``max_position_embeddings``, ``vocab_size``, ``lora_config``, ``_lora_model_cls``, ``_adapter_manager.model``)
   are unchanged over the range. GPU-tested on 0.25.

2. ``vllm.device_allocator.sleep_mode_backend.SleepModeBackendFactory.create_backend`` (CUDA only).
   Reason: the sleep-mode backend is chosen by ``ModelConfig.sleep_mode_backend`` (default ``"cumem"``), which
   ``LLM(...)`` cannot set (no engine argument in this range), and vLLM has no KV-only release before 0.31. With
   standby on (:func:`vllm_standby.enable`, ``VLLM_STANDBY=1`` or a :class:`vllm_standby.StandbyLLM`), the
   replacement returns :class:`vllm_standby.kv_sleep_backend.KVOnlySleepBackend` for ``"cumem"``, so ``LLM.sleep``
   releases only the KV cache and weights stay mapped; with standby off, or another backend named, the original runs.
   Upstream: ``vllm/device_allocator/sleep_mode_backend.py`` at v0.25.0 (RFC vllm-project/vllm#34303).
   Remove when: this range is dropped (vLLM 0.31 has ``LLM.release_kv_cache_memory``, used instead).
   Verified: one source hash 0.25.0-0.28.0; the GPU worker resolves its backend through the factory lazily
   (``Worker._get_sleep_mode_backend``) and calls ``suspend`` / ``resume`` only; the CuMem records keep ``handle``,
   ``tag`` and ``is_asleep``. GPU-tested on 0.25.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from vllm_standby.patches._targets import in_memory_lora, kv_only_sleep_backend

VLLM_RANGE = SpecifierSet(">=0.25,<0.29")

_LOAD_ADAPTER = "591a4449e2e6472abec00f6620784efeaf0a3637d5dfe1a605b3ffaca394e63d"
_CREATE_BACKEND = "9d5ecb263715381f581c88f842db4173960412613702c364ca65ccfe842361a7"
_RELEASES = ("0.25.0", "0.26.0", "0.27.0", "0.28.0")

PATCHES = (
    in_memory_lora(
        dict.fromkeys(_RELEASES, _LOAD_ADAPTER), "vllm/lora/worker_manager.py (v0.25.0)", mapper="get_unstacked_mapper"
    ),
    kv_only_sleep_backend(
        dict.fromkeys(_RELEASES, _CREATE_BACKEND),
        "vllm/device_allocator/sleep_mode_backend.py (v0.25.0), RFC vllm-project/vllm#34303",
    ),
)
