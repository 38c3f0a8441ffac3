"""Which attention the trainer's model runs: the config's `flex_attention` resolved for a model and a device, applied
to the model, and said in one log line.

`None` (the default) turns our flex attention (`flex_sinks`, registered as `"longctx_flex"`) on where it replaces
something quadratic: a model with attention sinks (a `sinks` parameter in an attention module, as gpt-oss has) that
runs transformers' `eager` attention, the only trainable one transformers 5.17 gives such a model, trained on CUDA,
whose class declares flex attention support. Every other case keeps the model's own attention and says why and which
setting changes it. `True` asks for ours on any model whose attention goes through transformers' `AttentionInterface`;
`False` keeps the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .flex_sinks import LONGCTX_FLEX, register_flex_attention

__all__ = ["AttentionChoice", "choose_attention", "has_attention_sinks", "use_flex_attention"]


@dataclass(frozen=True)
class AttentionChoice:
    """The attention a model runs and why.

    Args:
        implementation: The `attn_implementation` that runs (`"longctx_flex"` when ours does).
        model: The model's class name.
        reason: Why, naming the setting that changes it.
    """

    implementation: str
    model: str
    reason: str

    @property
    def ours(self) -> bool:
        return self.implementation == LONGCTX_FLEX

    def describe(self) -> str:
        """One log line: `Attention: longctx_flex for GptOssForCausalLM (...).`"""
        return f"Attention: {self.implementation} for {self.model} ({self.reason})."


def _pretrained(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_attention_sinks(model: nn.Module) -> bool:
    """Whether an attention module of `model` holds learned sink logits: a `sinks` parameter, as the attention modules
    of transformers' gpt-oss (and of the later models that copied it) do."""
    return any(isinstance(getattr(module, "sinks", None), nn.Parameter) for module in model.modules())


def choose_attention(
    setting: bool | None, model: nn.Module, device: torch.device, layout: str = "padded"
) -> AttentionChoice:
    """Resolve `flex_attention` (the config field) for `model` trained on `device` with `training_layout` `layout`.

    Args:
        setting: `True`, `False` or `None` (automatic; module docstring).
        model: The model to train (a PEFT wrapper is looked through).
        device: Where it trains.
        layout: The `training_layout`: a packed one on CUDA needs flex attention for its block-sparse masks
            (`trl_longctx.training_layout`), which `None` then turns on.

    Returns:
        The `AttentionChoice`; nothing is changed on the model (`use_flex_attention` does that).

    Raises:
        ValueError: Our attention asked for (`setting=True`, or the model loaded with it) on a device other than CUDA;
            `setting=False` with a packed layout on CUDA.
    """
    pretrained = _pretrained(model)
    name, current = type(pretrained).__name__, pretrained.config._attn_implementation
    sinks = has_attention_sinks(pretrained)
    if current == LONGCTX_FLEX:
        if device.type != "cuda":
            raise ValueError(
                f"{name} was loaded with attn_implementation={LONGCTX_FLEX!r}, which trains on CUDA only (torch has no "
                f"flex attention backward on {device.type}); load it with the model's own attention instead."
            )
        return AttentionChoice(LONGCTX_FLEX, name, f"loaded with attn_implementation={LONGCTX_FLEX!r}")
    if setting is True:
        if device.type != "cuda":
            raise ValueError(
                f"flex_attention=True needs training on CUDA, got {device.type}: torch runs flex attention's fused "
                "kernels only compiled on CUDA and has no flex attention backward on CPU. Allowed here: None or False."
            )
        return AttentionChoice(LONGCTX_FLEX, name, "flex_attention=True")
    if layout != "padded" and device.type == "cuda":
        return _for_packed_rows(setting, name, current, layout)
    quadratic = (
        ", whose [batch, heads, T, T] scores grow with the square of the sequence" if current == "eager" else ""
    )
    if setting is False:
        return AttentionChoice(current, name, f"the model's own{quadratic}, as flex_attention=False asks")
    if not sinks:
        why = "flex_attention=None uses longctx_flex only for models with attention sinks; True turns it on"
        return AttentionChoice(current, name, f"the model's own; {why}")
    if device.type != "cuda":
        return AttentionChoice(
            current, name, f"the model's own{quadratic}: longctx_flex trains on CUDA only, not on {device.type}"
        )
    if current != "eager":
        return AttentionChoice(current, name, f"the model's own {current!r}; flex_attention=True replaces it")
    if not getattr(type(pretrained), "_supports_flex_attn", False):
        return AttentionChoice(
            current, name, f"the model's own{quadratic}: {name} declares no flex attention support; "
            "flex_attention=True tries longctx_flex anyway",
        )  # fmt: skip
    return AttentionChoice(
        LONGCTX_FLEX, name, "attention sinks folded into compiled flex attention, memory linear in the sequence, "
        "instead of eager; flex_attention=False keeps eager",
    )  # fmt: skip


def _for_packed_rows(setting: bool | None, name: str, current: str, layout: str) -> AttentionChoice:
    """The attention of a packed `training_layout` on CUDA: flex attention, whose `BlockMask` grows linearly with the
    packed tokens, where any other attention would take a dense `[tokens, tokens]` mask."""
    if setting is False:
        raise ValueError(
            f"flex_attention must be None or True with training_layout={layout!r} on CUDA, got False: {name}'s own "
            f"attention ({current!r}) would take the packed rows' mask dense, [tokens, tokens], growing with the "
            "square of the tokens. Allowed: flex_attention=None or True, or training_layout='padded'."
        )
    if current == "flex_attention":
        return AttentionChoice(current, name, f"the model's own 'flex_attention', which takes the block masks of "
                               f"training_layout={layout!r}")  # fmt: skip
    return AttentionChoice(
        LONGCTX_FLEX, name, f"training_layout={layout!r} attends over block-sparse masks of packed rows, which flex "
        "attention runs in memory linear in the tokens; training_layout='padded' keeps the model's own",
    )  # fmt: skip


def use_flex_attention(model: nn.Module) -> None:
    """Make `model` (a PEFT wrapper is looked through) run `flex_sinks.flex_attention_forward`.

    Raises:
        RuntimeError: If the model does not take it: its attention does not go through transformers'
            `AttentionInterface`, so transformers cannot switch it (it only logs that).
    """
    register_flex_attention()
    pretrained = _pretrained(model)
    pretrained.set_attn_implementation(LONGCTX_FLEX)
    if pretrained.config._attn_implementation != LONGCTX_FLEX:
        raise RuntimeError(
            f"{type(pretrained).__name__} kept attn_implementation={pretrained.config._attn_implementation!r}: its "
            f"attention does not go through transformers' AttentionInterface, so {LONGCTX_FLEX!r} cannot run in it. "
            "flex_attention=False keeps the model's own attention."
        )
