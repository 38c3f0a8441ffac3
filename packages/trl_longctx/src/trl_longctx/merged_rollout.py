"""LoRA merged into weights shared with vLLM for the length of a rollout, then the base weights restored exactly.

With shared weights (`vllm_shared_weights`) vLLM samples from the trainer's frozen base tensors. Handing it the adapter
as a LoRA request makes it decode through LoRA kernels, markedly slower than plain decoding for the small groups
of sequences a GRPO rollout decodes. TRL avoids that with merged weights in a second copy of the model.
`AdapterMerger` merges the adapter into the shared tensors in place before the rollout (vLLM then decodes plain
weights, as TRL's copy does) and copies the base weights back afterwards from a host copy taken once: the base is
frozen, so the copy never goes stale, and restoring by copy (not by subtracting the delta again) is exact in bf16.
Cost: host memory for the adapted base weights (pinned on CUDA), one host-to-device copy of them per rollout. An
adapter on a Mixture-of-Experts model's fused expert weights (PEFT `target_parameters`) adapts whole expert stacks:
their host copy is the size of all the experts.
On by default with CUDA (`vllm_merge_adapter=None`), where the merged rollout makes the whole GRPO step faster than
the LoRA request does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, LoRA layer, adapter) for every LoRA layer with an active adapter, DoRA refused."""
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.use_dora.get(adapter, False):
                raise ValueError(f"vllm_merge_adapter=True does not support DoRA ({name}); allowed: LoRA adapters.")
            layers.append((name, module, adapter))
    return layers


def _adapted_weight(module: nn.Module) -> torch.Tensor:
    """The base tensor a LoRA layer adapts: the `weight` of its base layer, or for PEFT's `ParamWrapper` (LoRA on a
    parameter, e.g. an MoE layer's fused `gate_up_proj`) that parameter of the module it wraps."""
    parameter = getattr(module, "parameter_name", None)
    return getattr(module.get_base_layer(), parameter) if parameter else module.get_base_layer().weight


class AdapterMerger:
    """Merges a PEFT model's active LoRA adapters into its base weights for a block, then restores them bit for bit.

    Args:
        peft_model: The trainer's PEFT model, whose frozen base weights are shared with vLLM.
    """

    def __init__(self, peft_model: nn.Module):
        self.model = peft_model
        self._originals: dict[str, torch.Tensor] = {}

    @property
    def host_bytes(self) -> int:
        """Bytes of the host copy of the adapted base weights (0 before the first merge)."""
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    def _snapshot(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        original = self._originals.get(name)
        if original is None:
            pin = weight.device.type == "cuda"
            original = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=pin)
            original.copy_(weight)
            self._originals[name] = original
        return original

    @contextlib.contextmanager
    @torch.no_grad()
    def merged(self) -> Iterator[None]:
        """Within the block, every adapted base weight holds `W + scale * B @ A` (computed in fp32)."""
        layers = _lora_layers(self.model)
        weights = [(name, _adapted_weight(module)) for name, module, _ in layers]
        try:
            for (name, weight), (_, module, adapter) in zip(weights, layers, strict=True):
                self._snapshot(name, weight)
                delta = module.get_delta_weight(adapter).float()
                weight.copy_(weight.float().add_(delta))
            yield
        finally:
            for name, weight in weights:
                original = self._originals.get(name)
                if original is not None:
                    weight.copy_(original, non_blocking=True)
            if any(w.device.type == "cuda" for _, w in weights):
                torch.cuda.synchronize()
