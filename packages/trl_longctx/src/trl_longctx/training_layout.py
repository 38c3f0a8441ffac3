"""How the sequences of a log-prob pass are laid out for the decoder: padded (TRL's), packed, or shared-prompt.

TRL hands the pass `input_ids = cat(prompt_ids, completion_ids)` `[B, P + C]`: prompts left-padded to the longest
prompt `P`, completions right-padded to the longest completion `C` (`logits_to_keep`); the attention mask is 1 on the
real tokens. Each row's real tokens are therefore one contiguous run: the prompt's last `p` columns, then the
completion's first `c` columns (`c = 0` for a completion `mask_truncated_completions` masked).

- `"padded"`: the decoder runs `[B, P + C]`, padding included (TRL's layout; `run_log_prob_pass` without a plan).
- `"packed"`: the real tokens of a mini batch's rows side by side in one row `[1, N]`, `N = sum(p + c)`, each
  sequence a document of a block-diagonal causal mask: no padded position is computed.
- `"shared-prompt"`: rows whose prompts are identical (same real tokens; compared, never assumed) form a group;
  a group's prompt is laid out once, followed by its completions, each of which sees the prompt and itself
  (`attention.segment_mask`). The prompt's forward runs once per group and mini batch instead of once per
  completion, and its backward receives the gradients of all of them, summed by autograd. TRL shuffles the rows of a
  generation batch before slicing it into steps, so a group's rows are rarely adjacent: the plan orders the rows by
  group (`LayoutPlan.order`) before the mini batches are cut, and the results go back to TRL's order.

Exactness. Every token keeps the position the padded pass gives it (its column: transformers numbers the columns of
a row from 0 when no `position_ids` are passed, padding included), so RoPE rotates each query and key by the same
angle as in the padded pass (numbering each document from 0, as vLLM numbers a prompt, would give the same
attention only up to rounding: RoPE depends on position differences exactly, on the angles' rounding not); each query sees the same keys (its row's real tokens up to itself), so the attention,
and everything token-wise around it, computes the same values up to the order of summation. The log-probs are then
taken where the padded pass takes them: the hidden state before each completion token (for a completion's first
token, the prompt's last one: shared by the group). Positions where TRL's attention mask is 0 get log-prob and
entropy 0 (TRL's losses multiply them by its mask, which is 0 there).

Why a mask and not a KV cache for the shared prompt: running the prompt once with `use_cache=True` and the
completions against its cached keys and values would sum the gradients through the cache as well, but transformers
turns the cache off under gradient checkpointing in training, and a checkpointed layer recomputed in the backward
would have to rebuild the prompt's cache entries. With one packed row per mini batch, gradient checkpointing, the
offloaded checkpoints (`memory.offload_checkpoints`: each layer's input is the `[1, N, H]` packed row, `N` the mini
batch's real tokens instead of `B * (P + C)`) and the tiled MLPs work unchanged, and the memory of everything
token-wise shrinks with `N`. The mask is what costs: linear in `N` as flex attention's `BlockMask`; `N * N` bytes as
the dense mask sdpa or eager take (see `attention.segment_mask`).

Not served (the trainer refuses them before the first step, naming why; `layout_problem`): vision-language models
(image tokens sit in the prompt and 3D rotary positions would have to be re-derived per packed token), models with
sliding-window layers (the window would have to follow the padded columns, not the packed ones), the MoE router aux
loss (its token average would count a shared prompt once instead of per completion, and packing changes its
grouping), attentions that take no mask (flash attention kernels), decoders that take no `position_ids`, and an
adapter on the lm_head (the trainer then runs TRL's own log-prob pass, which has no layouts).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .attention.segment_mask import SEGMENT_MASK_ATTENTIONS, segment_attention_mask
from .config_checks import TRAINING_LAYOUTS
from .model_heads import decoder_and_lm_head, plain_lm_head_weights

__all__ = [
    "TRAINING_LAYOUTS",
    "LayoutPlan",
    "PackedRows",
    "describe_layout",
    "has_sliding_window_layers",
    "layout_problem",
    "plan_layout",
    "zero_padding",
]

_WHAT = {
    "padded": "TRL's, every sequence padded to the longest prompt and the longest completion",
    "packed": "the real tokens of each mini batch in one row, each sequence attending to itself",
    "shared-prompt": "the real tokens of each mini batch in one row, each prompt once per group of completions "
    "sharing it, each completion attending to the prompt and itself",
}


@dataclass(frozen=True)
class PackedRows:
    """The rows of one mini batch packed into one row `[1, N]`, and where their completion tokens are scored.

    Args:
        input_ids: `[1, N]` the real tokens.
        position_ids: `[1, N]` each token's column in TRL's padded layout (the position the padded pass gives it).
        documents, segments: `[N]` as `attention.segment_mask.segment_mask_function` takes them.
        predictors: `[M]` index into the packed row of the hidden state that predicts each scored token.
        targets: `[M]` the scored (completion) tokens.
        places: `[M]` flat index of each scored token in the mini batch's `[rows, logits_to_keep]` outputs.
        rows, logits_to_keep: The shape of those outputs.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    documents: torch.Tensor
    segments: torch.Tensor
    predictors: torch.Tensor
    targets: torch.Tensor
    places: torch.Tensor
    rows: int
    logits_to_keep: int

    @property
    def tokens(self) -> int:
        """`N`, the real tokens the decoder runs."""
        return self.input_ids.size(1)

    def decoder_inputs(self, config, dtype: torch.dtype) -> dict:
        """The decoder's keywords: the packed ids, their positions and the mask in the form `config`'s attention
        takes (`attention.segment_mask.segment_attention_mask`)."""
        mask = segment_attention_mask(config, self.documents, self.segments, dtype)
        return {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": self.position_ids}

    def place(self, values: torch.Tensor) -> torch.Tensor:
        """`[M]` values of the scored tokens -> `[rows, logits_to_keep]`, 0 where nothing was scored."""
        flat = values.new_zeros(self.rows * self.logits_to_keep)
        return flat.index_copy(0, self.places, values).view(self.rows, self.logits_to_keep)


@dataclass(frozen=True)
class LayoutPlan:
    """Where each row's real tokens are and which rows share a prompt; cuts `PackedRows` per mini batch.

    Args:
        layout: `"packed"` or `"shared-prompt"`.
        order: The rows in the order the mini batches take them (grouped by prompt for `"shared-prompt"`).
        groups: Group of each row (rows with identical prompts share one; each row its own for `"packed"`).
        prompt_lengths, completion_lengths: Real tokens of each row's prompt and completion.
        prompt_width: `P`, the columns of the prompt part.
        logits_to_keep: `C`, the columns of the completion part.
    """

    layout: str
    order: tuple[int, ...]
    groups: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    completion_lengths: tuple[int, ...]
    prompt_width: int
    logits_to_keep: int

    @property
    def reordered(self) -> bool:
        """Whether the mini batches take the rows in another order than TRL's."""
        return self.order != tuple(range(len(self.order)))

    def real_tokens(self) -> int:
        """Tokens the decoder runs for the whole batch in this layout (each shared prompt once per group, when no
        mini batch cuts a group)."""
        prompts = {
            g: p for g, p, c in zip(self.groups, self.prompt_lengths, self.completion_lengths, strict=True) if c
        }
        return sum(prompts.values()) + sum(self.completion_lengths)

    def mini_batch(self, input_ids: torch.Tensor, start: int, end: int) -> PackedRows:
        """The rows `order[start:end]` of `input_ids` packed: each group of consecutive rows with one prompt is a
        document (the prompt once, as segment 0, then each completion as its own segment); rows without completion
        tokens are left out (nothing of theirs is scored).

        Args:
            input_ids: `[B, P + C]` TRL's ids.
            start, end: The mini batch's slice of `order`.
        """
        width, keep = self.prompt_width, self.logits_to_keep
        # Segments, in packed order: (row, first column, length, document, segment id, scored row or -1).
        segments: list[tuple[int, int, int, int, int, int]] = []
        previous_group, document = None, -1
        for local, row in enumerate(self.order[start:end]):
            completion = self.completion_lengths[row]
            if completion == 0:
                continue
            if self.groups[row] != previous_group:
                previous_group, document, member = self.groups[row], document + 1, 0
                prompt = self.prompt_lengths[row]
                segments.append((row, width - prompt, prompt, document, 0, -1))
            member += 1
            segments.append((row, width, completion, document, member, local))
        return _pack(input_ids, segments, rows=end - start, logits_to_keep=keep)


def _runs(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`cat([arange(s, s + n) for s, n in zip(starts, lengths)])`, without a Python loop over tokens."""
    total = int(lengths.sum())
    offsets = torch.cumsum(lengths, 0) - lengths
    index = torch.arange(total, device=starts.device)
    return index + torch.repeat_interleave(starts - offsets, lengths, output_size=total)


def _pack(input_ids: torch.Tensor, segments: list, rows: int, logits_to_keep: int) -> PackedRows:
    device = input_ids.device
    if not segments:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return PackedRows(empty[None], empty[None], empty, empty, empty, empty, empty, rows, logits_to_keep)
    table = torch.tensor(segments, dtype=torch.long, device=device)
    seg_rows, first_columns, lengths, docs, seg_ids, scored_rows = table.unbind(1)
    columns = _runs(first_columns, lengths)
    token_rows = torch.repeat_interleave(seg_rows, lengths, output_size=columns.numel())
    packed_starts = torch.cumsum(lengths, 0) - lengths
    scored = scored_rows >= 0
    # Completion tokens: predicted by the packed token before them, the first one by its document's prompt's last.
    targets_at = _runs(packed_starts[scored], lengths[scored])
    predictors = targets_at - 1
    prompt_last = (packed_starts + lengths - 1)[~scored]  # one prompt segment per document, in document order
    first = torch.cumsum(lengths[scored], 0) - lengths[scored]
    predictors[first] = prompt_last[docs[scored]]
    places = _runs(scored_rows[scored] * logits_to_keep, lengths[scored])
    ids = input_ids[token_rows, columns]
    return PackedRows(
        input_ids=ids[None], position_ids=columns[None], documents=torch.repeat_interleave(docs, lengths),
        segments=torch.repeat_interleave(seg_ids, lengths), predictors=predictors, targets=ids[targets_at],
        places=places, rows=rows, logits_to_keep=logits_to_keep,
    )  # fmt: skip


def plan_layout(
    layout: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> LayoutPlan | str:
    """The plan of `layout` for TRL's batch, or why the batch runs padded instead.

    Args:
        layout: `"packed"` or `"shared-prompt"`.
        input_ids, attention_mask: `[B, P + C]` as TRL passes them (left-padded prompts, right-padded completions).
        logits_to_keep: `C`.

    Returns:
        The `LayoutPlan`; or, when this batch cannot take the layout, the reason (a sentence) it runs padded:
        real tokens that are not one prompt suffix and one completion prefix per row, a completion without a prompt
        token before it, no completion token at all, or (shared-prompt) no two rows with the same prompt.

    Raises:
        ValueError: `layout` is not `"packed"` or `"shared-prompt"`.
    """
    if layout not in TRAINING_LAYOUTS[1:]:
        raise ValueError(f"plan_layout: layout must be one of {list(TRAINING_LAYOUTS[1:])}, got {layout!r}.")
    width = input_ids.size(1) - logits_to_keep
    mask = attention_mask.bool()
    prompt_mask, completion_mask = mask[:, :width], mask[:, width:]
    # Left padding: a prompt's mask never falls from 1 to 0; right padding: a completion's never rises from 0 to 1.
    contiguous = (prompt_mask[:, 1:] >= prompt_mask[:, :-1]).all() & (
        completion_mask[:, 1:] <= completion_mask[:, :-1]
    ).all()
    prompt_lengths, completion_lengths = prompt_mask.sum(1), completion_mask.sum(1)
    orphan = ((completion_lengths > 0) & (prompt_lengths == 0)).any()
    groups, order = _prompt_groups(input_ids[:, :width], prompt_mask, layout)
    # One host round trip for everything the packing reads.
    contiguous, orphan, prompt_lengths, completion_lengths, groups, order = _to_host(
        contiguous, orphan, prompt_lengths, completion_lengths, groups, order
    )
    if not contiguous:
        return (
            "its attention mask is not left-padded prompts followed by right-padded completions (real tokens with "
            "padding between them)"
        )
    if orphan:
        return "a row has completion tokens but no prompt token to predict the first one from"
    if not any(completion_lengths):
        return "no row has a completion token to score"
    if layout == "shared-prompt" and len(set(groups)) == len(groups):
        return "no two of its rows share a prompt"
    return LayoutPlan(layout, tuple(order), tuple(groups), tuple(prompt_lengths), tuple(completion_lengths),
                      width, logits_to_keep)  # fmt: skip


def _prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, layout: str):
    """Group of each row and the rows ordered by group (groups in order of their first row)."""
    rows = prompt_ids.size(0)
    index = torch.arange(rows, device=prompt_ids.device)
    if layout == "packed":
        return index, index
    # Rows are the same prompt when their real tokens are: padding is set to -1, so it matches only padding, and
    # two prompts of different lengths differ where one is padded and the other is not.
    keys = prompt_ids.masked_fill(~prompt_mask, -1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first_row = torch.full((rows,), rows, device=index.device, dtype=index.dtype).scatter_reduce(
        0, inverse, index, reduce="amin"
    )
    groups = first_row[inverse]  # a group is named by its first row: groups in order of appearance
    order = torch.sort(groups, stable=True).indices
    return groups, order


def _to_host(*tensors: torch.Tensor) -> list:
    """Each tensor as a Python value (a list for vectors), through one device-to-host copy."""
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).tolist()
    values, start = [], 0
    for t in tensors:
        values.append(flat[start] if t.dim() == 0 else flat[start : start + t.numel()])
        start += t.numel()
    return values


def zero_padding(values: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """`values` `[B, logits_to_keep]` with 0 where the completion's attention mask is 0 (as the layouts give them)."""
    return values.masked_fill(attention_mask[:, -logits_to_keep:] == 0, 0.0)


def describe_layout(layout: str, attention: str) -> str:
    """The trainer's log line: which layout runs, and the form of its mask with the model's `attention`."""
    if layout == "padded":
        return f"Training layout: padded ({_WHAT[layout]}; 'packed' or 'shared-prompt' computes no padding)."
    form = (
        "a flex attention BlockMask, memory linear in the tokens"
        if attention in ("flex_attention", "longctx_flex")
        else f"a dense [tokens, tokens] mask for {attention!r}"
    )
    return f"Training layout: {layout} ({_WHAT[layout]}; {form}). A batch it cannot take runs padded, logged once."


def has_sliding_window_layers(config) -> bool:
    """Whether a (text) config has attention layers with a sliding window (`layer_types`, or the older
    `sliding_window` + `use_sliding_window` fields)."""
    layer_types = getattr(config, "layer_types", None) or ()
    return any(t != "full_attention" for t in layer_types) or bool(
        not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    )


def layout_problem(model, layout: str, router_aux_loss: bool) -> str | None:
    """Why `model` cannot train with `layout`, or `None` when it can (module docstring, "Not served").

    Args:
        model: The model being trained (a PEFT wrapper is looked through).
        layout: The `training_layout` setting.
        router_aux_loss: Whether the run computes the MoE router aux loss (TRL's `aux_loss_enabled`).
    """
    if layout == "padded":
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config, name = base.config, type(base).__name__
    if getattr(config, "vision_config", None) is not None:
        return f"{name} is a vision-language model: its image tokens and 3D rotary positions are not packed"
    if has_sliding_window_layers(config):
        return f"{name} has sliding-window attention layers, whose window the packed mask does not apply"
    if router_aux_loss:
        return (
            f"{name} computes the MoE router aux loss, whose token average the layout would change (a shared prompt "
            "counted once, packed mini batches grouped differently); router_aux_loss_coef=0.0 leaves it out"
        )
    decoder, lm_head = decoder_and_lm_head(model)
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return f"{name}'s decoder takes no position_ids, which the packed tokens need to keep their positions"
    if plain_lm_head_weights(lm_head) is None:
        return f"{name}'s lm_head carries an adapter, so TRL's own log-prob pass runs, which packs nothing"
    if config._attn_implementation not in SEGMENT_MASK_ATTENTIONS:
        return (
            f"{name} runs attn_implementation={config._attn_implementation!r}, which takes no packed mask; allowed: "
            f"{list(SEGMENT_MASK_ATTENTIONS)}"
        )
    return None
