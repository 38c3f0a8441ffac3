"""The router load-balancing auxiliary loss of a Mixture-of-Experts model, computed from its decoder's outputs.

GRPO's trainer gets this loss from the causal LM's fused lm_head forward, which runs the decoder with
`output_router_logits=True` and calls Mixtral's `load_balancing_loss_func` (the function every transformers MoE family
copies through the modular system) on the router logits the decoder records, with the text config's `num_experts`
and `num_experts_per_tok` and the attention mask of the mini batch. The fused log-prob pass runs the decoder, not the
causal LM, so it asks the decoder for the router logits and makes that same call (`RouterAuxLoss`);
`router_aux_loss(model)` refuses, naming the architecture and what is missing, a model whose config lacks the expert
counts or whose decoder records no router logits.

The loss is not additive over sequences (it multiplies two per-expert means), and GRPO's trainer averages it over its
mini batches of `batch_size` sequences; `RouterAuxLossMean` keeps that mean whatever mini batches the decoder runs in:
it gathers the router logits of decoder passes until a group of that many sequences is complete, computes the group's
loss, and averages the groups' losses (the last group may be smaller, as GRPO's last mini batch). Router logits are per
token, so a group's logits gathered from several passes are those of one pass over the group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RouterAuxLoss", "RouterAuxLossMean", "RouterAuxLossUnsupported", "router_aux_loss"]


class RouterAuxLossUnsupported(TypeError):
    """The model's router aux loss cannot be computed from its decoder's outputs as GRPO's fused forward does."""


@dataclass(frozen=True)
class RouterAuxLoss:
    """The aux loss of one model: `loss_function(router_logits, num_experts, top_k, attention_mask)`.

    Attributes:
        architecture: The causal LM's class name (for messages).
        loss_function: The load-balancing function GRPO's fused lm_head forward calls (Mixtral's).
        num_experts: Experts per MoE layer (the text config's `num_experts`).
        top_k: Experts each token is routed to (the text config's `num_experts_per_tok`).
    """

    architecture: str
    loss_function: Callable[..., torch.Tensor]
    num_experts: int
    top_k: int

    def __call__(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The loss of one decoder pass from the router logits it recorded and the attention mask it ran with.

        Raises:
            RuntimeError: The decoder recorded no router logits (so the loss would silently be 0).
        """
        if not isinstance(router_logits, tuple) or not router_logits:
            raise RuntimeError(
                f"{self.architecture}'s decoder returned no router logits (got {type(router_logits).__name__}) with "
                "output_router_logits=True; its router load-balancing aux loss cannot be computed."
            )
        return self.loss_function(router_logits, self.num_experts, self.top_k, attention_mask)


def router_aux_loss(model: nn.Module) -> RouterAuxLoss:
    """What computes `model`'s router aux loss from its decoder's outputs, as GRPO's fused lm_head forward does.

    Args:
        model: A transformers MoE causal LM, or a PEFT model wrapping one.

    Raises:
        RouterAuxLossUnsupported: The text config has no integer `num_experts` / `num_experts_per_tok`, or the
            decoder records no router logits; the message names the architecture and what is missing.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    text_config = base.config.get_text_config()
    num_experts = getattr(text_config, "num_experts", None)
    top_k = getattr(text_config, "num_experts_per_tok", None)
    if not isinstance(num_experts, int) or not isinstance(top_k, int):
        raise RouterAuxLossUnsupported(
            f"{name}: its text config has no integer num_experts / num_experts_per_tok (got {num_experts!r}, "
            f"{top_k!r}), the expert counts the load-balancing loss is computed with."
        )
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if "router_logits" not in (getattr(decoder, "_can_record_outputs", None) or {}):
        raise RouterAuxLossUnsupported(
            f"{name}: its decoder ({type(decoder).__name__}) does not record router logits (no 'router_logits' in "
            "_can_record_outputs), so output_router_logits=True would return none."
        )
    return RouterAuxLoss(name, load_balancing_loss_func, num_experts, top_k)


class RouterAuxLossMean:
    """The mean of `aux_loss` over consecutive groups of `group` sequences, fed by decoder passes of any size.

    Args:
        aux_loss: The model's `RouterAuxLoss`.
        group: Sequences per loss (GRPO's `batch_size`).

    Raises:
        ValueError: `group` is not positive.
    """

    def __init__(self, aux_loss: RouterAuxLoss, group: int):
        if group < 1:
            raise ValueError(f"group must be a positive number of sequences, got {group}.")
        self.aux_loss, self.group = aux_loss, group
        self._pending: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []  # (router logits, mask) per pass
        self._pending_sequences = 0
        self._losses: list[torch.Tensor] = []

    def add(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> None:
        """Take one decoder pass: its router logits (per MoE layer, `[b * T, experts]`) and attention mask `[b, T]`.

        Raises:
            RuntimeError: No router logits, or a layer's rows are not one per token of the pass.
        """
        if not isinstance(router_logits, tuple) or not router_logits:
            self.aux_loss(router_logits, attention_mask)  # raises, naming the architecture
        tokens = attention_mask.numel()
        rows = [layer.size(0) for layer in router_logits]
        if any(r != tokens for r in rows):
            raise RuntimeError(
                f"{self.aux_loss.architecture}'s router logits have {rows} rows per layer for a pass of "
                f"{tuple(attention_mask.shape)} tokens; the aux loss needs one row per token."
            )
        self._pending.append((router_logits, attention_mask))
        self._pending_sequences += attention_mask.size(0)
        while self._pending_sequences >= self.group:
            self._losses.append(self._take(self.group))

    def mean(self) -> torch.Tensor:
        """The mean over the groups, the sequences left over making the last (smaller) group.

        Raises:
            RuntimeError: No pass was added.
        """
        if self._pending_sequences:
            self._losses.append(self._take(self._pending_sequences))
        if not self._losses:
            raise RuntimeError(f"No decoder pass of {self.aux_loss.architecture} was added; there is no aux loss.")
        return torch.stack(self._losses).mean()

    def _take(self, sequences: int) -> torch.Tensor:
        """The loss of the first `sequences` pending sequences, which leave the pending ones."""
        logits_parts, mask_parts, needed = [], [], sequences
        while needed:
            logits, mask = self._pending[0]
            if mask.size(0) <= needed:
                self._pending.pop(0)
                logits_parts.append(logits)
                mask_parts.append(mask)
                needed -= mask.size(0)
                continue
            rows = needed * mask.size(1)
            logits_parts.append(tuple(layer[:rows] for layer in logits))
            mask_parts.append(mask[:needed])
            self._pending[0] = (tuple(layer[rows:] for layer in logits), mask[needed:])
            needed = 0
        self._pending_sequences -= sequences
        if len(mask_parts) == 1:
            return self.aux_loss(logits_parts[0], mask_parts[0])
        layers = tuple(torch.cat(parts) for parts in zip(*logits_parts, strict=True))
        return self.aux_loss(layers, torch.cat(mask_parts))
