"""The log-prob pass with each sequence split across a sequence-parallel group, through DeepSpeed Ulysses.

DeepSpeed's `UlyssesSPAttentionHF` (ALST, `deepspeed.runtime.sequence_parallel.ulysses_sp`, the engine behind
Accelerate's `ParallelismConfig(sp_backend="deepspeed")`) wraps the model's attention function: each rank holds
`1/sp` of a sequence's tokens, an all-to-all before attention gives every rank the whole sequence for `heads/sp` of
the heads, and one after it returns the rank's tokens for all heads. Everything else in the decoder is token-wise,
so each rank runs the embeddings, MLPs, norms and our fused lm_head + log-softmax on its own shard only: the
activations and checkpoints of a sequence `T` long cost `T/sp` tokens per rank.

How the rows are shared out follows DeepSpeed's `UlyssesSPDataLoaderAdapter`: the ranks of the group hold different
GRPO rows (TRL's own per-process batches), so the pass first shares every rank's rows (their real tokens only) with
the group, then runs them one at a time, every rank taking its slice of each. A slice's log-probs (and entropies)
are all-gathered with a differentiable collective, and each rank keeps its own rows, in TRL's `[B, logits_to_keep]`
layout. TRL's loss then runs unchanged on each rank, and the gradients of the decoder's parameters on each rank are
the parts of every rank's loss that its shards carry: their sum over the group is the gradient of the sum of the
ranks' losses, which is what DDP (or ZeRO/FSDP) averages across processes anyway.

Exactness. Ulysses takes no attention mask (`register_with_transformers` drops it and the core attention runs
causal), so padding cannot be masked: each row runs on its real tokens only, one contiguous run in TRL's layout (see
`training_layout`), followed by at most `sp - 1` filler tokens to make its length divisible by `sp`. Filler tokens
come after every real token, so causal attention keeps them out of every scored position. Each token keeps its
column in TRL's padded layout as its position (`position_ids`, which Ulysses all-gathers for the core attention),
so RoPE rotates it as the padded pass does; what changes is only the order of summation.

Lifetime. The attention function is replaced while the `UlyssesLogProbs` context is entered, and the backward must
run inside it too: under gradient checkpointing the layers recompute their attention during the backward, and a
recompute through the plain attention would see one shard only (torch's non-reentrant checkpoint then stops on the
recomputed tensors' shapes; the two-process test shows it). Ulysses also rewrites `num_key_value_groups` of the
attention modules when it replicates KV heads (fewer KV heads than ranks); leaving the context restores both.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from longctx_kernels import selective_logprobs

from .memory.tiled_mlp import tile_mlps
from .model_heads import LogitTransform
from .training_layout import has_sliding_window_layers

if TYPE_CHECKING:
    from .logprob_pass import LogProbPass

logger = logging.getLogger(__name__)

__all__ = [
    "DEEPSPEED_MIN_VERSION",
    "ULYSSES_ATTENTIONS",
    "SequenceParallelPass",
    "UlyssesLogProbs",
    "leave_process_group",
    "sequence_parallel_group",
    "sequence_parallel_pass",
]

# The first release whose `UlyssesSPAttentionHF` Accelerate accepts for `sp_backend="deepspeed"`; verified on 0.19.8.
DEEPSPEED_MIN_VERSION = "0.18.2"
# The `UlyssesSPAttentionHF.__init__` parameters this module passes by name (checked at construction).
_ULYSSES_PARAMETERS = {
    "attn", "batch_size", "attn_head_count", "attn_head_size", "kv_head_count", "num_hidden_layers",
    "process_group", "seq_length_is_variable",
}  # fmt: skip
# Attentions that run causal without a mask, as Ulysses calls them (it drops the mask; for flex attention it builds a
# causal `BlockMask` of the gathered sequence). `eager` needs a dense 4D mask, which Ulysses refuses too.
ULYSSES_ATTENTIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_INSTALL_HINT = "pip install 'trl-longctx[deepspeed]'"
_NO_TRANSFORM = LogitTransform()


@dataclass(frozen=True)
class _Row:
    """One GRPO row as the group runs it: its real tokens, their first column in TRL's layout, and which of them are
    scored (`scored` completion tokens, the first at index `first`; predicted from index `first - 1`)."""

    tokens: list[int]
    column: int
    first: int
    scored: int


def _ulysses_class() -> type:
    """DeepSpeed's `UlyssesSPAttentionHF`, refusing an absent or too old DeepSpeed."""
    try:
        import deepspeed
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    except ImportError as error:
        raise ImportError(
            f"UlyssesLogProbs runs DeepSpeed's Ulysses sequence parallelism (deepspeed>={DEEPSPEED_MIN_VERSION}), "
            f"which is not importable here ({error}). Install it with: {_INSTALL_HINT}"
        ) from error
    from packaging.version import Version

    if Version(deepspeed.__version__) < Version(DEEPSPEED_MIN_VERSION):
        raise ImportError(
            f"deepspeed=={deepspeed.__version__} is older than {DEEPSPEED_MIN_VERSION}, the first with "
            f"`UlyssesSPAttentionHF` as Accelerate uses it. Upgrade with: {_INSTALL_HINT}"
        )
    missing = _ULYSSES_PARAMETERS - set(inspect.signature(UlyssesSPAttentionHF.__init__).parameters)
    if missing:
        raise ImportError(
            f"deepspeed=={deepspeed.__version__}: UlyssesSPAttentionHF.__init__ lacks {sorted(missing)}; this module "
            f"was verified on deepspeed 0.19.8. Pin deepspeed to a release that has them."
        )
    return UlyssesSPAttentionHF


def _ensure_deepspeed_comm() -> None:
    """Let DeepSpeed's communication layer (which Ulysses calls) wrap the process group torch already runs."""
    import deepspeed.comm

    if not dist.is_initialized():
        raise RuntimeError("UlyssesLogProbs needs torch.distributed initialised (torchrun / accelerate launch).")
    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


class _GroupAllGather(torch.autograd.Function):
    """All-gather of one tensor per rank of `group`, differentiable: the backward sums each rank's gradients of the
    gathered tensors over the group and keeps its own (a reduce-scatter).

    torch's `torch.distributed.nn.functional.all_gather` does the same, but on gloo its backward scatters with group
    ranks where `dist.scatter` takes global ones, and fails for a group that is not the first ranks of the world
    ("Global rank 0 is not part of group", torch 2.13): a sequence-parallel group smaller than the world.
    """

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, tensor, group=group)
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[None, torch.Tensor]:
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            own = torch.empty_like(grads[rank])
            dist.reduce_scatter(own, [g.contiguous() for g in grads], group=ctx.group)
            return None, own
        summed = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(summed, group=ctx.group)
        return None, summed[rank]


class UlyssesLogProbs:
    """Per-token log-probs (and entropies) of GRPO rows whose sequences are split across `group` by DeepSpeed Ulysses.

    Args:
        model: The (unwrapped) causal LM; its text config gives the heads, and its `config._attn_implementation`
            names the attention that Ulysses wraps (`ULYSSES_ATTENTIONS`). No router aux loss is computed for MoE
            models (their experts are token-wise and run on each shard).
        group: The sequence-parallel process group (every rank of it calls the pass together); default: the world.

    Raises:
        ImportError: DeepSpeed is absent, too old, or its `UlyssesSPAttentionHF` has moved.
        ValueError: The attention is not one of `ULYSSES_ATTENTIONS` (`eager`), the model has sliding-window layers
            or images, the heads do not divide by the group size, or the group has one rank.

    Example:
        >>> ulysses = UlyssesLogProbs(model)
        >>> with ulysses:
        ...     logps, entropies = ulysses(decoder, (weight, None), input_ids, attention_mask, logits_to_keep)
        ...     loss_from(logps).backward()
    """

    def __init__(
        self, model: nn.Module, group: dist.ProcessGroup | None = None, *, others: tuple[nn.Module, ...] = ()
    ):
        ulysses_class = _ulysses_class()
        _ensure_deepspeed_comm()
        self.group = group if group is not None else dist.group.WORLD
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        _refuse_unsupported(model.config, model.config._attn_implementation, self.size)
        for other in others:
            if other.config._attn_implementation != model.config._attn_implementation:
                raise ValueError(
                    f"A model run through the same Ulysses pass uses attn_implementation="
                    f"{other.config._attn_implementation!r}, the trained model {model.config._attn_implementation!r}: "
                    "only the latter is split across ranks. Load both with the same attn_implementation "
                    "(model_init_kwargs)."
                )
        config = model.config.get_text_config()
        self.attention = model.config._attn_implementation
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._functions = ALL_ATTENTION_FUNCTIONS
        self._core = ALL_ATTENTION_FUNCTIONS[self.attention]
        self._ulysses = ulysses_class(
            attn=self._core, batch_size=1, attn_head_count=config.num_attention_heads,
            attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            kv_head_count=config.num_key_value_heads, num_hidden_layers=config.num_hidden_layers,
            process_group=self.group, seq_length_is_variable=True,
        )  # fmt: skip
        self._ulysses.core_attn_implementation = self.attention
        modules = (m for each in (model, *others) for m in each.modules())
        self._kv_groups = {m: m.num_key_value_groups for m in modules if hasattr(m, "num_key_value_groups")}
        self._installed = False

    def _attend(self, module, query, key, value, attention_mask, *args, **kwargs):
        # The mask transformers built is the local shard's; the gathered sequence runs causal (no padding left).
        if self.attention != "flex_attention":
            attention_mask = None
        return self._ulysses(module, query, key, value, attention_mask, *args, **kwargs)

    def __enter__(self) -> UlyssesLogProbs:
        if self._installed:
            raise RuntimeError("UlyssesLogProbs is already entered; enter it once around forward and backward.")
        self._functions[self.attention] = self._attend
        self._installed = True
        return self

    def __exit__(self, *exc_info) -> None:
        self._functions[self.attention] = self._core
        for module, groups in self._kv_groups.items():
            module.num_key_value_groups = groups
        self._installed = False

    def __call__(
        self,
        decoder: nn.Module,
        head: tuple[torch.Tensor, torch.Tensor | None],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        *,
        compute_entropy: bool = False,
        temperature: float = 1.0,
        transform: LogitTransform = _NO_TRANSFORM,
        backend: str = "auto",
        chunk_size: int | None = None,
        autocast: Callable[[], Any] | None = None,
        decoder_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run this rank's rows, and its share of every other rank's rows, through the decoder and fused lm_head.

        Args:
            decoder, head: `model_heads.decoder_and_lm_head`'s decoder and the lm_head's `(weight, bias)` `[V, H]`.
            input_ids, attention_mask: `[B, T]` this rank's prompt + completion rows in TRL's layout (prompts
                left-padded, completions right-padded); `B` and `T` may differ between ranks.
            logits_to_keep: Completion tokens scored (the last columns).
            compute_entropy, temperature, transform, backend, chunk_size: As `longctx_kernels.selective_logprobs`.
            autocast: The accelerator's autocast context factory.
            decoder_context: A context factory entered around each decoder forward (checkpoint offloading, MLP
                tiling: `logprob_pass` attaches both this way).

        Returns:
            `(logps, entropies)`, each `[B, logits_to_keep]` float32 for this rank's rows (0 where TRL's mask is 0);
            `entropies` is `None` unless `compute_entropy`. Differentiable: the backward needs every rank of the
            group, inside this context.

        Raises:
            RuntimeError: Called outside the context.
            ValueError: A row's real tokens are not one contiguous run, or it scores a token with no prompt before it.
        """
        if not self._installed:
            raise RuntimeError("Call UlyssesLogProbs inside `with ulysses:` (the attention is replaced only there).")
        rows = _own_rows(input_ids, attention_mask, logits_to_keep)
        everyone: list[list[_Row]] = [[] for _ in range(self.size)]
        dist.all_gather_object(everyone, rows, group=self.group)
        device, channels = head[0].device, 2 if compute_entropy else 1
        options = {
            "temperature": temperature, "logit_scale": transform.logit_scale, "logit_divisor": transform.logit_divisor,
            "softcap": transform.softcap, "return_entropy": compute_entropy, "backend": backend,
            "chunk_size": chunk_size,
        }  # fmt: skip
        pieces, spans = [], []  # this rank's slice of every row, and where each row's slices sit in the gathered rows
        offset = 0
        for row in (row for rows_of_rank in everyone for row in rows_of_rank):
            if row.scored == 0:
                spans.append(None)
                continue
            local = math.ceil(len(row.tokens) / self.size)
            with autocast() if autocast is not None else contextlib.nullcontext():
                pieces.append(self._slice_values(decoder, head, row, local, options, decoder_context))
            spans.append((offset, local))
            offset += local
        local_values = torch.cat(pieces) if pieces else torch.zeros((0, channels), device=device)
        gathered = _GroupAllGather.apply(self.group, local_values)
        return self._own_results(everyone, spans, gathered, input_ids, logits_to_keep, compute_entropy)

    def _slice_values(self, decoder, head, row: _Row, local: int, options: dict, decoder_context) -> torch.Tensor:
        """`[local, 1 or 2]`: log-prob (and entropy) at each position of this rank's slice of `row`, 0 where the
        position predicts no scored token; `options`: `selective_logprobs`' keyword arguments."""
        weight, bias = head
        device, compute_entropy = weight.device, options["return_entropy"]
        length = local * self.size
        # Filler after the last real token (its own value): causal attention keeps it out of every scored position.
        tokens = torch.tensor(row.tokens + row.tokens[-1:] * (length - len(row.tokens)), device=device)
        positions = torch.arange(row.column, row.column + length, device=device)
        start = self.rank * local
        with decoder_context() if decoder_context is not None else contextlib.nullcontext():
            hidden = decoder(
                input_ids=tokens[None, start : start + local], position_ids=positions[None, start : start + local],
                use_cache=False,
            ).last_hidden_state[0]  # fmt: skip
        # Positions first - 1 .. first + scored - 2 predict the scored tokens; clip them to this slice.
        lo, hi = max(row.first - 1, start), min(row.first - 1 + row.scored, start + local)
        values = torch.zeros((local, 2 if compute_entropy else 1), dtype=torch.float32, device=device)
        if lo >= hi:
            # Keeps the slice and the lm_head in the graph: every rank's backward runs its layers (Ulysses' all-to-all)
            # and gives the lm_head a gradient, which DDP waits for on every rank (a rank whose slices are all prompt
            # tokens left the other waiting in its gradient all-reduce).
            kept = hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0)
            return values + 0 * kept
        outputs = selective_logprobs(
            hidden[lo - start : hi - start].to(weight.dtype), weight, tokens[lo + 1 : hi + 1], bias=bias, **options
        )
        scored = torch.stack(outputs, -1) if compute_entropy else outputs[:, None]
        return torch.cat([values[: lo - start], scored.float(), values[hi - start :]])

    def _own_results(self, everyone, spans, gathered, input_ids, logits_to_keep, compute_entropy):
        """This rank's rows, reassembled from every rank's slices and placed in TRL's `[B, logits_to_keep]`."""
        first_own = sum(len(rows) for rows in everyone[: self.rank])
        channels = 2 if compute_entropy else 1
        out_rows = []
        for index, row in enumerate(everyone[self.rank]):
            span = spans[first_own + index]
            values = torch.zeros((logits_to_keep, channels), dtype=torch.float32, device=gathered[0].device)
            if span is not None:
                offset, local = span
                whole = torch.cat([part[offset : offset + local] for part in gathered])
                scored = whole[row.first - 1 : row.first - 1 + row.scored]
                # The first scored token's column in the kept completion columns.
                at = row.column + row.first - (input_ids.size(1) - logits_to_keep)
                values = torch.cat([values[:at], scored, values[at + row.scored :]])
            out_rows.append(values)
        stacked = torch.stack(out_rows) if out_rows else torch.zeros((0, logits_to_keep, channels))
        return stacked[..., 0], (stacked[..., 1] if compute_entropy else None)


def leave_process_group() -> None:
    """Destroy the default process group with no reference to it left in DeepSpeed, after every rank's last pass.

    A rank that exits while DeepSpeed's registry of Ulysses all-to-all groups (`deepspeed.sequence.layer`) still
    holds one aborts at interpreter exit now and then ("terminate called without an active exception", SIGABRT;
    seen in 1 of 4 two-process runs until the registry was cleared).
    """
    import deepspeed.comm
    from deepspeed.sequence import layer

    layer._all_to_all_groups.clear()
    if dist.is_initialized():  # a colocated vLLM engine's teardown destroys the default group itself
        dist.barrier()
        deepspeed.comm.destroy_process_group()


def sequence_parallel_group(size: int) -> dist.ProcessGroup:
    """This rank's group of `size` consecutive ranks (`[0, size)`, `[size, 2 * size)`, ...).

    Every rank creates every group, in the same order, as `torch.distributed.new_group` requires.

    Raises:
        ValueError: `size` does not divide the world size (the config refuses it first).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"sequence_parallel_size must divide the number of processes ({world}), got {size}.")
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    return groups[rank // size]


class SequenceParallelPass:
    """The trainer's log-prob passes through `UlyssesLogProbs`: sizes, offloading and MLP tiles from the run's
    `LogProbPass`, and the Ulysses attention installed only while a pass and its backward need it.

    A pass without gradients (TRL's old and reference log-probs) enters and leaves the Ulysses context around itself.
    A pass with gradients leaves it entered, because the backward recomputes checkpointed layers through it; the
    trainer leaves it after the step (`step()`), or `release()` does. Generation and reward models never run inside
    it: TRL generates and scores before the training pass of a step.

    Args:
        ulysses: The run's `UlyssesLogProbs`.
        passes: The run's `LogProbPass` (backend, planner sizes, checkpoint offloader).
    """

    def __init__(self, ulysses: UlyssesLogProbs, passes: LogProbPass):
        self.ulysses, self._passes, self._entered = ulysses, passes, False

    def __call__(
        self,
        model: nn.Module,
        decoder: nn.Module,
        head: tuple[torch.Tensor, torch.Tensor | None],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        **options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`UlyssesLogProbs.__call__` on `model`'s decoder, with the sizes, offloading and MLP tiles of one sequence
        of `ceil(T / sp)` tokens per rank; `options`: its `compute_entropy`, `temperature`, `transform`, `autocast`."""
        passes = self._passes
        local = math.ceil(input_ids.size(1) / self.ulysses.size)
        sizes = passes.sizes(model.config, head[0].size(0), 1, local, min(logits_to_keep, local))

        def around_decoder() -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            if passes.offload:
                stack.enter_context(passes.offloader.offload(model))
            stack.enter_context(tile_mlps(model, sizes.tiled_mlp_chunks))
            return stack

        held = self._entered
        if not held:
            self.ulysses.__enter__()
            self._entered = True
        try:
            return self.ulysses(
                decoder, head, input_ids, attention_mask, logits_to_keep, backend=passes.backend,
                chunk_size=sizes.logit_chunk_tokens, decoder_context=around_decoder, **options,
            )  # fmt: skip
        finally:
            if not held and not torch.is_grad_enabled():
                self.release()

    def release(self) -> None:
        """Leave the Ulysses context, if entered: the model's own attention runs again."""
        if self._entered:
            self._entered = False
            self.ulysses.__exit__(None, None, None)

    @contextlib.contextmanager
    def step(self):
        """A training step: whatever pass with gradients it runs, the context is left when the step ends."""
        try:
            yield
        finally:
            self.release()


def sequence_parallel_pass(
    args: Any, model: nn.Module, passes: LogProbPass, *, ref_model: nn.Module | None, refusals: dict[str, bool]
) -> SequenceParallelPass | None:
    """The run's `SequenceParallelPass` for `args.sequence_parallel_size`, or `None` when it is 1.

    Args:
        args: The trainer's `LongContextGRPOConfig`.
        model: The unwrapped model that trains.
        passes: The run's `LogProbPass`.
        ref_model: A separate reference model (full fine-tuning with `beta > 0`), run through the same attention.
        refusals: What the trainer knows once built: `"router_aux_loss"` (TRL's `aux_loss_enabled`),
            `"lm_head_adapter"` (no plain lm_head weight), `"fsdp"`, `"deepspeed"` (the accelerator's wrapper).

    Raises:
        ValueError: One of `refusals` holds, or `UlyssesLogProbs` refuses the model; the message names the setting
            and the way out.
    """
    size = args.sequence_parallel_size
    if size == 1:
        return None
    _refuse(refusals, size)
    others = (ref_model,) if ref_model is not None else ()
    ulysses = UlyssesLogProbs(model, sequence_parallel_group(size), others=others)
    logger.warning(
        "Sequence parallelism: each row's tokens are split over the %d ranks of group %d (DeepSpeed Ulysses, %s).",
        size, dist.get_rank() // size, ulysses.attention,
    )  # fmt: skip
    return SequenceParallelPass(ulysses, passes)


# What each refusal of `sequence_parallel_pass` asks for.
_FIXES = {
    "router_aux_loss": "router_aux_loss_coef=0.0 (the router aux loss needs every token of a row at once)",
    "lm_head_adapter": "no adapter on the lm_head (take 'lm_head' out of the LoRA target_modules and "
    "modules_to_save: the fused pass reads its plain weight)",
    "fsdp": "DDP instead of FSDP (sequence parallelism is tested with DDP only)",
    "deepspeed": "DDP instead of DeepSpeed (sequence parallelism is tested with DDP only)",
}


def _refuse(refusals: dict[str, bool], size: int) -> None:
    for name, holds in refusals.items():
        if holds:
            raise ValueError(f"sequence_parallel_size={size} needs {_FIXES[name]}; or set sequence_parallel_size=1.")


def refuse_before_load(args: Any, model: Any, peft_config: Any = None) -> None:
    """Make the refusals of `sequence_parallel_pass` that the checkpoint's config and the peft config decide before
    anything loads: attention, sliding windows, vision, head counts, the router aux loss, an lm_head adapter.

    Only where `model` names a checkpoint whose config is at hand (a folder, or the Hugging Face cache; nothing is
    fetched); a model object, or a checkpoint not downloaded yet, is checked once built, as before.

    Args:
        args: The trainer's `LongContextGRPOConfig` (`sequence_parallel_size`, `model_init_kwargs`,
            `router_aux_loss_coef`).
        model: What the trainer was given: a checkpoint name or folder, or a model.
        peft_config: The trainer's peft config, or `None`.

    Raises:
        ValueError: As `sequence_parallel_pass` would once the model is loaded.
    """
    size = args.sequence_parallel_size
    if size == 1:
        return
    targets = set(_names(getattr(peft_config, "target_modules", None)))
    targets |= set(_names(getattr(peft_config, "modules_to_save", None)))
    _refuse({"lm_head_adapter": "lm_head" in targets}, size)
    if not isinstance(model, str):
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):  # not at hand: checked once the model is loaded
        return
    attention = (getattr(args, "model_init_kwargs", None) or {}).get("attn_implementation") or "sdpa"
    _refuse_unsupported(config, attention, size)
    text = config.get_text_config()
    coef = args.router_aux_loss_coef
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    _refuse({"router_aux_loss": hasattr(text, "output_router_logits") and coef != 0.0}, size)  # as TRL decides it


def _names(value) -> list[str]:
    """Module names of a peft config field: a list, one name, or `None` (`"all-linear"` never adapts the lm_head)."""
    if value is None or value == "all-linear":
        return []
    return [value] if isinstance(value, str) else list(value)


def _refuse_unsupported(config, attention: str, size: int) -> None:
    """Refuse what Ulysses cannot run, naming the setting and the fix."""
    if size < 2:
        raise ValueError(
            f"UlyssesLogProbs got a sequence-parallel group of {size} rank; it splits sequences over 2 or more. "
            "With one rank, run the ordinary log-prob pass (`logprob_pass.run_log_prob_pass`)."
        )
    if attention not in ULYSSES_ATTENTIONS:
        raise ValueError(
            f"attn_implementation={attention!r} cannot run under DeepSpeed Ulysses, which gives the attention no mask "
            f"(the gathered sequence runs causal). Allowed: {list(ULYSSES_ATTENTIONS)}. Load the model with "
            "attn_implementation='sdpa' (model_init_kwargs)."
        )
    if has_sliding_window_layers(config.get_text_config()):
        raise ValueError(
            f"{type(config).__name__} has sliding-window attention layers (layer_types / sliding_window), whose window "
            "Ulysses does not apply: it runs every layer full causal. Sequence parallelism serves full-attention "
            "models only."
        )
    if getattr(config, "vision_config", None) is not None:
        raise ValueError(
            f"{type(config).__name__} is a vision-language model: its image inputs and 3D rotary positions are not "
            "split across ranks. Sequence parallelism serves text-only models."
        )
    text = config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    if heads % size or (kv_heads % size and size % kv_heads):
        raise ValueError(
            f"Ulysses splits attention heads across the {size} ranks of the sequence-parallel group: "
            f"num_attention_heads={heads} must be divisible by {size}, and num_key_value_heads={kv_heads} must "
            f"divide or be divisible by it. Use a sequence-parallel size that divides {heads}."
        )


def _own_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> list[_Row]:
    """This rank's rows as `_Row`s (on the host, to be shared with the group)."""
    columns = input_ids.size(1)
    completion_start = columns - logits_to_keep
    rows = []
    for index, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(), strict=True)):
        real = [column for column, kept in enumerate(mask) if kept]
        if not real or real[-1] - real[0] + 1 != len(real):
            raise ValueError(
                f"Row {index}: its attention mask is not one run of 1s (TRL's left-padded prompt + right-padded "
                "completion); Ulysses takes no mask, so padding inside a row cannot be left out."
            )
        start, end = real[0], real[-1] + 1
        first = max(completion_start, start) - start
        scored = max(0, end - max(completion_start, start))
        if scored and first == 0:
            raise ValueError(f"Row {index}: a scored completion token has no prompt token before it to predict it.")
        rows.append(_Row(tokens=ids[start:end], column=start, first=first, scored=scored))
    return rows
