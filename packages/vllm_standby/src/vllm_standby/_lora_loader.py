"""Replacement of vLLM's ``WorkerLoRAManager._load_adapter`` that also reads in-memory adapters.

Shared by the version-range modules (:mod:`vllm_standby.patches`); each passes what differs between its vLLM
releases: the weights mapper vLLM's loader uses and the checks it runs on the loaded adapter.
"""

from __future__ import annotations

import functools
from typing import Any


def in_memory_adapter_loader(original: Any, *, mapper: str, validators: tuple[str, ...] = ()) -> Any:
    """Wrap ``original`` so that a ``vllm-standby://`` path loads from :mod:`vllm_standby.lora`'s registry.

    The ``LoRAModel`` is built with vLLM's own ``PEFTHelper.from_dict`` (validated against the engine's LoRA config)
    and ``LoRAModel.from_lora_tensors``, on the adapter tensors' device: a CUDA adapter stays on the GPU (no host
    round trip). Any other path goes to ``original``.

    Args:
        original: vLLM's ``WorkerLoRAManager._load_adapter``.
        mapper: Method of the model's ``hf_to_vllm_mapper`` that vLLM's loader uses in this release
            (``"get_unstacked_mapper"`` in 0.25-0.28, ``"get_rename_mapper"`` from 0.29).
        validators: Methods of the adapter manager that vLLM's loader calls on the loaded ``LoRAModel``, in its
            order (e.g. ``"_validate_modules_to_save"`` from 0.31).

    Returns:
        The replacement ``_load_adapter``.
    """

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        from vllm_standby.lora import lookup

        entry = lookup(lora_request.lora_path)
        if entry is None:
            return original(self, lora_request)
        from vllm.lora.peft_helper import PEFTHelper

        tensors, config = entry
        peft_helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": self.max_position_embeddings})
        peft_helper.validate_legal(self.lora_config)
        model = self._adapter_manager.model
        hf_to_vllm = getattr(model, "hf_to_vllm_mapper", None)
        device = next(iter(tensors.values())).device if tensors else "cpu"
        lora = self._lora_model_cls.from_lora_tensors(
            lora_model_id=lora_request.lora_int_id,
            tensors=tensors,
            peft_helper=peft_helper,
            device=str(device),
            dtype=self.lora_config.lora_dtype,
            model_vocab_size=self.vocab_size,
            weights_mapper=None if hf_to_vllm is None else getattr(hf_to_vllm, mapper)(),
            skip_prefixes=getattr(model, "lora_skip_prefixes", None),
        )
        lora.is_3d_lora_weight = lora_request.is_3d_lora_weight
        for validator in validators:
            getattr(self._adapter_manager, validator)(lora)
        _refuse_unapplied_tower_weights(self._adapter_manager, lora)
        return lora

    _load_adapter.__vllm_standby__ = True
    return _load_adapter


def _refuse_unapplied_tower_weights(manager: Any, lora: Any) -> None:
    """Raise where the adapter has weights on a multimodal model's vision tower or connector that the engine would not
    apply (vLLM applies them only when built with ``enable_tower_connector_lora=True`` on a model that supports it,
    and otherwise generates without them, silently)."""
    model = manager.model
    if not hasattr(model, "get_mm_mapping") or getattr(manager, "supports_tower_connector_lora", False):
        return
    mapping = model.get_mm_mapping()
    prefixes = tuple(p for p in (*(mapping.tower_model or ()), *(mapping.connector or ())) if p)
    unapplied = sorted(name for name in lora.loras if name.startswith(prefixes))
    if unapplied:
        raise ValueError(
            f"The in-memory LoRA adapter has weights on the vision tower or connector ({unapplied[:3]}, "
            f"{len(unapplied)} modules), which this engine would not apply: build it with "
            "enable_tower_connector_lora=True (vLLM releases that have it, for models that support it), keep the "
            "adapter off the tower (target the language model's modules only), or merge the adapter into the weights."
        )
