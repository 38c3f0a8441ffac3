"""The attention mask of packed token rows: documents side by side, each a shared prefix followed by segments that see
the prefix and themselves, never each other.

Every token of a packed row carries a document id and a segment id. A query sees a key when the key is not after it,
both belong to the same document, and the key is in the document's prefix (segment 0) or in the query's own segment:

    visible(q, kv) = kv <= q  and  document[kv] == document[q]  and  (segment[kv] == 0  or  segment[kv] == segment[q])

A packed sequence (a prompt and its completion, one document per sequence) is that with one segment per document; the
G completions of a shared prompt are segments 1..G of the prompt's document. The mask is built by transformers'
masking utilities for the attention the model runs (`AttentionMaskInterface`, keyed by `config._attn_implementation`),
from `segment_mask_function`, so each attention gets its own form:

- `"flex_attention"` and `"longctx_flex"` (`trl_longctx.attention.flex_sinks`): a flex attention `BlockMask`, built by
  `create_block_mask` (compiled): per 128 x 128 block of the `[N, N]` mask one entry, so its memory grows linearly
  with the `N` tokens of the row and the kernels skip the blocks nobody sees;
- `"sdpa"`: a dense boolean `[1, 1, N, N]` mask; `"eager"`: the same as 0 / the dtype's minimum, added to the scores.
  These take `N * N` bytes (or 4 `N * N` in float32) for the row, shared by all layers: fine for tests and short
  rows, which is why the trainer runs flex attention with these layouts on CUDA.

transformers passes a prepared 4D mask (a tensor or a `BlockMask`) to the attention unchanged
(`masking_utils._preprocess_mask_arguments`), so the decoder runs with this mask when it is given as its
`attention_mask`. Flash attention kernels take no such mask (they take `cu_seqlens`), so they are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .flex_sinks import LONGCTX_FLEX

__all__ = ["SEGMENT_MASK_ATTENTIONS", "segment_attention_mask", "segment_mask_function"]

# The attention implementations whose masks transformers builds from a mask function and passes on as they are.
SEGMENT_MASK_ATTENTIONS = ("sdpa", "eager", "flex_attention", LONGCTX_FLEX)


def segment_mask_function(documents: torch.Tensor, segments: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The mask function of a packed row (transformers' and flex attention's `mask_mod` signature).

    Args:
        documents: `[N]` integer document id of each token of the row.
        segments: `[N]` integer segment id of each token: 0 for the document's shared prefix, a positive id per
            segment that sees only the prefix and itself.

    Returns:
        `mask(batch_idx, head_idx, q_idx, kv_idx)`: whether query `q_idx` sees key `kv_idx` (module docstring);
        index tensors of any broadcastable shapes (transformers' dense builders) or scalars (`create_block_mask`).
    """

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        same_document = documents[q_idx] == documents[kv_idx]
        visible_segment = (segments[kv_idx] == 0) | (segments[kv_idx] == segments[q_idx])
        return (kv_idx <= q_idx) & same_document & visible_segment

    return mask


def segment_attention_mask(
    config, documents: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | object:
    """The attention mask of one packed row in the form the model's attention takes (module docstring).

    Args:
        config: The decoder's config; `config._attn_implementation` picks the form.
        documents, segments: `[N]` per token, as `segment_mask_function` takes them (on the model's device).
        dtype: The dtype of the decoder's activations (the eager mask's additive values).

    Returns:
        A `BlockMask` for flex attention, a `[1, 1, N, N]` boolean (sdpa) or `dtype` (eager) tensor otherwise.

    Raises:
        ValueError: The model runs an attention that takes no such mask (flash attention kernels, custom ones).

    Example:
        >>> documents, segments = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 1, 2, 0, 1])
        >>> segment_attention_mask(config, documents, segments, torch.float32).shape  # config: sdpa
        torch.Size([1, 1, 6, 6])
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    implementation = config._attn_implementation
    if implementation not in SEGMENT_MASK_ATTENTIONS:
        raise ValueError(
            f"A packed row's attention mask needs one of the attentions {list(SEGMENT_MASK_ATTENTIONS)}, got "
            f"attn_implementation={implementation!r} (flash attention kernels take sequence offsets, not a mask)."
        )
    tokens = documents.numel()
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=1, q_length=tokens, kv_length=tokens, mask_function=segment_mask_function(documents, segments),
        attention_mask=None, allow_is_causal_skip=False, dtype=dtype, config=config, use_vmap=False,
        device=documents.device,
    )  # fmt: skip
