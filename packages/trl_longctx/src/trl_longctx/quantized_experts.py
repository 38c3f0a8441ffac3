"""What 4-bit loading leaves in 16 bits on a Mixture-of-Experts model.

bitsandbytes quantizes `nn.Linear` layers. transformers 5.x holds the experts of its MoE models as fused 3-D
parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`: `[experts, in, out]`), which are not `nn.Linear`,
so `load_in_4bit` quantizes the attention (and dense MLPs) and leaves the experts, most of such a model's weights, in
the dtype they were loaded in. The run still trains; the trainer says so once instead of letting a QLoRA run hold
several times the memory its user planned for.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unquantized_experts_notice"]


def unquantized_experts_notice(model: nn.Module) -> str | None:
    """A warning for a model loaded in 4 bits whose fused expert weights were not quantized; `None` for any other
    model (not 4-bit, or no fused experts).

    Example:
        >>> unquantized_experts_notice(nn.Linear(2, 2)) is None
        True
    """
    if not getattr(model, "is_loaded_in_4bit", False):
        return None
    experts = [(name, p) for name, p in model.named_parameters() if p.dim() == 3 and ".experts." in name]
    if not experts:
        return None
    count = sum(p.numel() for _, p in experts)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in experts})
    return (
        f"load_in_4bit: bitsandbytes quantized this model's nn.Linear layers only. Its {len(experts)} fused "
        f"Mixture-of-Experts weights ({count / 1e9:.2f}B parameters, e.g. {experts[0][0]}) stay {'/'.join(dtypes)}, "
        "so they take 2 bytes per parameter, not about 0.5: plan the run as LoRA for the experts (`longctx-grpo plan` "
        "counts them so in every mode). bitsandbytes cannot quantize fused expert weights; load the model without "
        "load_in_4bit to silence this."
    )
