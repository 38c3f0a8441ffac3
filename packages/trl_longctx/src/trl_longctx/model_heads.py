"""Where a Hugging Face causal LM keeps its decoder and lm_head, and how it post-processes logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .memory.shapes import text_config


@dataclass(frozen=True)
class LogitTransform:
    """Scalars applied to `hidden @ lm_head.T`, in this order, as `longctx_kernels.selective_logprobs` takes them."""

    logit_scale: float | None = None
    logit_divisor: float | None = None
    softcap: float | None = None


def logit_transform_from_config(config) -> LogitTransform:
    """Read the model's logit scaling and softcapping from its (text) config.

    Covers Gemma 2/3 (`final_logit_softcapping`), Cohere (`logit_scale`), Granite (`logits_scaling`, a divisor) and
    Falcon-H1 (`lm_head_multiplier`). Models without any of these get the identity transform.
    """
    text = text_config(config)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    divisor = getattr(text, "logits_scaling", None)
    softcap = getattr(text, "final_logit_softcapping", None)
    return LogitTransform(
        logit_scale=None if scale in (None, 1, 1.0) else float(scale),
        logit_divisor=None if divisor in (None, 1, 1.0) else float(divisor),
        softcap=None if not softcap else float(softcap),
    )


def decoder_and_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return `(decoder, lm_head)` of a transformers causal LM, looking through a PEFT wrapper.

    The decoder maps `input_ids` to `last_hidden_state` (`[B, T, H]`); the lm_head holds `weight` `[V, H]`.

    Raises:
        TypeError: If the model exposes no decoder or no output embeddings.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or lm_head is None:
        raise TypeError(
            f"{type(base).__name__} exposes no decoder (`get_decoder`) or lm_head (`get_output_embeddings`)."
        )
    return decoder, lm_head


def plain_lm_head_weights(lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Return `(weight, bias)` when the lm_head is a plain linear layer; `None` when an adapter wraps it."""
    if type(lm_head) is not nn.Linear:
        return None
    return lm_head.weight, lm_head.bias
