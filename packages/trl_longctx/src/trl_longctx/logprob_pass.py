"""One log-prob pass: the decoder over mini batches, then the fused lm_head + log-softmax over logit chunks.

The sizes it runs by (`ChunkSizes`: sequences per decoder pass, tokens per logit chunk, MLP tiles) are decided here
and nowhere else: the configured values; on CUDA (or with a free-memory figure given) the memory planner's choice for
what is free, per `(sequences, length, completion)`; and, after a step ran out of memory, the lowered caps that the
out-of-memory retry set for the rest of the run. The trainer's hook, its retry and the benchmarks call this module;
the sizes live on the `LogProbPass` object, never in the config.

For a Mixture-of-Experts model the pass also returns the router load-balancing aux loss when asked
(`aux_loss=moe_aux.router_aux_loss(model)`): each decoder pass records its router logits, and the model's own loss
function takes them by groups of `sequences` sequences (TRL's `batch_size`) with their attention mask, averaged over
the groups as TRL's own log-prob pass averages the causal LM's `aux_loss` over its mini batches, whatever mini batch
the decoder runs in (`moe_aux.RouterAuxLossMean`).

For a vision-language model (`vision_language`) the decoder is the multimodal backbone: each mini batch gets its
sequences' image inputs (`images`, `vision_language.ImageInputs`, sliced as TRL's own pass slices them), runs the
vision tower and the language decoder to hidden states; offloaded checkpoints and tiled MLPs attach to the language
decoder's layers (`layers`). The planner counts the image tokens (part of each sequence's length) and what the vision
tower keeps for its backward (`memory.planner.VisionShape`).

The logit chunk is tokens per chunk of `[tokens, vocab]` float32 logits in the torch backend. The Triton backend
tiles on its own, in fixed tiles whose memory does not grow with the pass: it has no logit chunk
(`ChunkSizes.logit_chunk_tokens is None`), and `logit_chunk_multiplier` is refused with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from longctx_kernels import default_chunk_size, resolve_backend, selective_logprobs

from .memory.offload_checkpoints import CheckpointOffloader
from .memory.planner import ATTENTIONS, ChunkSizes, mlp_tile_counts
from .memory.shapes import VisionLoad, text_config
from .memory.tiled_mlp import tile_mlps
from .model_heads import LogitTransform
from .moe_aux import RouterAuxLoss, RouterAuxLossMean
from .training_layout import LayoutPlan, plan_layout, zero_padding
from .vision_language import ImageInputs

logger = logging.getLogger(__name__)

_NO_TRANSFORM = LogitTransform()
_NO_IMAGES = VisionLoad()

__all__ = ["ChunkSizes", "LogProbPass", "lowered_sizes", "mini_batch_bounds", "run_log_prob_pass"]


def cuda_free_bytes() -> float:
    """What a step may still allocate on the current CUDA device: free memory plus the allocator's cached blocks."""
    return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def lowered_sizes(used: ChunkSizes, tokens_per_sequence: int) -> ChunkSizes | None:
    """What a try that ran out of memory with `used` retries with: half the mini batch and half the logit chunk; at
    a mini batch of one and no chunk left to halve, the next MLP tile count. `None` when nothing is left to lower.

    Args:
        used: The sizes of the pass that ran out of memory.
        tokens_per_sequence: Prompt + completion tokens of one sequence (the tiled MLP's rows per sequence).
    """
    mini_batch = max(1, used.grpo_mini_batch // 2)
    chunk = None if used.logit_chunk_tokens is None else max(1, used.logit_chunk_tokens // 2)
    tiles = used.tiled_mlp_chunks
    if mini_batch == used.grpo_mini_batch and chunk == used.logit_chunk_tokens:
        more = [t for t in mlp_tile_counts(mini_batch * tokens_per_sequence) if t > tiles]
        if not more:
            return None
        tiles = more[0]
    return ChunkSizes(mini_batch, chunk, tiles)


def resolved_backend(args: Any, device: torch.device) -> str:
    """The backend `args.logprob_backend` runs on `device`, refusing settings it cannot honour.

    Raises:
        ValueError: `logit_chunk_multiplier` is set while the Triton backend runs (it has no logit chunk).
        RuntimeError: `logprob_backend="triton"` cannot run here (`longctx_kernels.resolve_backend` says why).
    """
    backend = resolve_backend(args.logprob_backend, device)
    if backend == "triton" and args.logit_chunk_multiplier is not None:
        raise ValueError(
            f"logit_chunk_multiplier={args.logit_chunk_multiplier} sizes the torch backend's logit chunks; the Triton "
            f"backend (logprob_backend={args.logprob_backend!r} on {device.type}) works in fixed tiles of its own, "
            "whose memory does not grow with the pass. Allowed with it: None; or logprob_backend='torch'."
        )
    return backend


class LogProbPass:
    """The log-prob pass of one run: its sizes per shape, the planner, the retry's caps, the checkpoint offloader.

    Args:
        args: The trainer's `LongContextGRPOConfig` (`grpo_mini_batch`, `logit_chunk_multiplier`, `tiled_mlp_chunks`,
            `offload_checkpoints`, `gradient_checkpointing`, `logprob_backend`).
        device: Where training runs.
        mode: The planner's training mode: `"lora"`, `"qlora"` or `"full"`.
        lora_rank: Rank of the LoRA adapter (the planner counts its parameters), `None` without one.
        attention: The `attn_implementation` the decoder runs; `"longctx_flex"` is planned as such
            (`memory.planner.ATTENTIONS`), any other as SDPA.
        lora_experts: Whether the adapter is also on MoE expert weights (PEFT `target_parameters`).
        router_aux_loss: Whether the router aux loss is computed (TRL's `aux_loss_enabled`), so that its router
            logits are kept.
        lora_dropout: Whether the adapter applies dropout (the planner counts its masks and outputs).

    Attributes:
        backend: `"torch"` or `"triton"`, as `longctx_kernels.resolve_backend` resolves `logprob_backend` here.
        free_bytes: Returns the bytes a step may still allocate; the planner is used when it is set (on CUDA by
            default). Tests set it to plan on CPU.
        used: The sizes of every pass since `begin_try()` (the retry lowers the last one's).
        offloader: The run's `CheckpointOffloader` (pinned buffers reused by every step).
        layout: The `training_layout` every pass runs (`training_layout`), batch by batch: a batch it cannot take
            runs padded.
        fallbacks: Why batches ran padded under another layout (each reason logged once).

    Raises:
        ValueError: `logit_chunk_multiplier` is set while the Triton backend runs (it has no logit chunk).
    """

    def __init__(
        self,
        args: Any,
        device: torch.device,
        mode: str = "lora",
        lora_rank: int | None = None,
        attention: str = "sdpa",
        *,
        lora_experts: bool = False,
        router_aux_loss: bool = True,
        lora_dropout: bool = False,
    ):
        self.backend = resolved_backend(args, device)
        self._args, self._device, self._mode, self._lora_rank = args, device, mode, lora_rank
        self._attention = attention if attention in ATTENTIONS else "sdpa"
        self._moe = {"lora_experts": lora_experts, "router_aux_loss": router_aux_loss}
        self._lora_dropout = lora_dropout
        self.free_bytes: Callable[[], float] | None = cuda_free_bytes if device.type == "cuda" else None
        self.offloader = CheckpointOffloader()
        self.used: list[ChunkSizes] = []
        self._lengths: list[int] = []  # tokens per sequence of each pass in `used`
        self._caps: ChunkSizes | None = None
        self._planned: dict[tuple[int, int, int], ChunkSizes] = {}
        self.layout: str = getattr(args, "training_layout", "padded")
        self.fallbacks: set[str] = set()  # why batches ran padded under another layout (each logged once)

    @property
    def offload(self) -> bool:
        """Whether checkpointed layer inputs go to pinned host memory (`offload_checkpoints`, `None` resolved)."""
        return _offload_setting(self._args, self._device)

    def begin_try(self) -> None:
        """Start recording the sizes of the passes of one try of a training step."""
        self.used, self._lengths = [], []

    def lower_after_oom(self) -> ChunkSizes | None:
        """Cap every later pass at `lowered_sizes` of the last pass of this try and forget the planner's choices.

        Returns:
            The lowered sizes; `None` when no pass ran in this try or nothing is left to lower.
        """
        if not self.used:
            return None
        lowered = lowered_sizes(self.used[-1], self._lengths[-1])
        if lowered is not None:
            self._caps = lowered
            self._planned.clear()  # re-planned for the memory free after the failure, then capped
        return lowered

    def sizes(
        self,
        config: Any,
        vocab_size: int,
        sequences: int,
        length: int,
        completion: int,
        optimizer_states_allocated: bool = False,
        vision: VisionLoad = _NO_IMAGES,
    ) -> ChunkSizes:
        """The sizes a pass over `sequences` sequences of `length` tokens (`completion` of them scored) runs by, for a
        model of `config` whose lm_head has `vocab_size` rows; `vision`: what its images feed the vision tower."""
        args = self._args
        mini_batch, tiles = args.grpo_mini_batch, args.tiled_mlp_chunks
        planned = None
        if self.free_bytes is not None and (mini_batch is None or tiles is None):
            planned = self._plan(config, sequences, length, completion, optimizer_states_allocated, vision)
        mini_batch = min(mini_batch or (planned.grpo_mini_batch if planned else sequences), sequences)
        tiles = tiles or (planned.tiled_mlp_chunks if planned else 1)
        chunk = None
        if self.backend == "torch":
            chunk = self._logit_chunk(mini_batch, completion, vocab_size, planned)
        if self._caps is not None:
            mini_batch = min(mini_batch, self._caps.grpo_mini_batch)
            tiles = max(tiles, self._caps.tiled_mlp_chunks)
            if chunk is not None and self._caps.logit_chunk_tokens is not None:
                chunk = min(chunk, self._caps.logit_chunk_tokens)
        return ChunkSizes(mini_batch, chunk, tiles)

    def host_buffer_sizes(
        self,
        config: Any,
        vocab_size: int,
        sequences: int,
        length: int,
        completion: int,
        element_bytes: int,
        optimizer_states_allocated: bool = False,
        vision: VisionLoad = _NO_IMAGES,
    ) -> list[int]:
        """The host buffers a training pass over `sequences` sequences of `length` tokens (`completion` scored) offloads
        into, alive at once (`sizes` decides the sequences per decoder pass, `vision` the images it plans for): one per
        offloaded layer of the (language) decoder and decoder pass, `pass sequences x length x hidden size x
        element_bytes` bytes each (`element_bytes`: of the decoder's hidden states). Empty when nothing is offloaded."""
        if not self.offload:
            return []
        text = text_config(config)
        layers = text.num_hidden_layers - (1 if self.offloader.keep_last_on_device else 0)
        mini_batch = self.sizes(config, vocab_size, sequences, length, completion, optimizer_states_allocated, vision)
        passes = [end - start for start, end in mini_batch_bounds(sequences, mini_batch.grpo_mini_batch)]
        return [n * length * text.hidden_size * element_bytes for n in passes for _ in range(layers)]

    def _logit_chunk(self, mini_batch: int, completion: int, vocab_size: int, planned: ChunkSizes | None) -> int:
        """Tokens per logit chunk (torch backend), never more than the mini batch's tokens."""
        tokens = mini_batch * completion
        multiplier = self._args.logit_chunk_multiplier
        if multiplier is not None:
            return min(mini_batch * math.ceil(completion / multiplier), tokens)
        if planned is not None:
            return min(planned.logit_chunk_tokens, tokens)
        return min(default_chunk_size(vocab_size), tokens)

    def _plan(
        self,
        config,
        sequences: int,
        length: int,
        completion: int,
        optimizer_states_allocated: bool,
        vision: VisionLoad,
    ):
        key = (sequences, length, completion, vision)
        if key not in self._planned:
            from .memory.planner import auto_chunk_sizes

            free = self.free_bytes()
            args = self._args
            planned = auto_chunk_sizes(
                config, free, sequences, length - completion, completion, mode=self._mode,
                lora_rank=self._lora_rank or 32, offload_checkpoints=self.offload, logprob_backend=self.backend,
                optimizer_states_allocated=optimizer_states_allocated, tile_mlps=args.tiled_mlp_chunks is None,
                grpo_mini_batch=args.grpo_mini_batch, vision_patches=vision.patches, vision_trained=vision.trained,
                attention=self._attention, lora_dropout=self._lora_dropout, **self._moe,
            )  # fmt: skip
            self._planned[key] = planned
            if planned.grpo_mini_batch < sequences or planned.tiled_mlp_chunks > 1:
                logger.warning(
                    "The memory planner runs %d of %d sequences per decoder pass with %d MLP tile(s) (%.1f GiB free, "
                    "%d + %d tokens each).",
                    planned.grpo_mini_batch, sequences, planned.tiled_mlp_chunks, free / 2**30, length - completion,
                    completion,
                )  # fmt: skip
        return self._planned[key]

    def __call__(
        self,
        model: torch.nn.Module,
        decoder: torch.nn.Module,
        head: tuple[torch.Tensor, torch.Tensor | None],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        *,
        sequences: int | None = None,
        compute_entropy: bool = False,
        temperature: float = 1.0,
        transform: LogitTransform = _NO_TRANSFORM,
        autocast: Callable[[], Any] | None = None,
        optimizer_states_allocated: bool = False,
        aux_loss: RouterAuxLoss | None = None,
        images: ImageInputs | None = None,
        layers: torch.nn.Module | None = None,
        vision_trained: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-token log-probs `[B, logits_to_keep]` (float32) of the completion tokens, their entropies, and the
        router aux loss (mean over mini batches) when `aux_loss` is given.

        Args:
            model: The (unwrapped) model whose decoder runs: offloading and MLP tiling attach to its layers (unless
                `layers` is given).
            decoder, head: `model_heads.decoder_and_lm_head`'s decoder and `plain_lm_head_weights`' `(weight, bias)`.
            input_ids, attention_mask: `[B, T]` prompt + completion.
            logits_to_keep: Completion tokens scored (the last ones).
            sequences: The batch the planner sizes for (TRL's `batch_size`), default `B`.
            compute_entropy, temperature, transform: As `longctx_kernels.selective_logprobs`.
            autocast: The accelerator's autocast context factory.
            optimizer_states_allocated: Whether the optimizer's states already exist (the planner counts them as
                resident).
            aux_loss: The model's `moe_aux.RouterAuxLoss`, to return its mean over groups of `sequences` sequences;
                `None`: no aux loss.
            images: A vision-language model's image inputs of the `B` sequences (`decoder` is then its multimodal
                backbone, `vision_language.VisionLanguageParts.backbone`); `None` without images.
            layers: The module whose decoder layers offloading and MLP tiling attach to (a vision-language model's
                language decoder); default `model`.
            vision_trained: Whether the vision tower takes gradients (the planner then counts its saved tensors).
        """
        patches = images.patches_per_sequence() if images is not None else []
        vision = VisionLoad(max(patches, default=0), vision_trained)
        # The planner is told TRL's padded lengths in every layout. For "packed" they are no looser than the real
        # ones: TRL pads to the longest prompt and the longest completion, so a mini batch of the longest rows needs
        # them, and the planner sizes mini batches by the sequence. For "shared-prompt" the prompt is counted once per
        # sequence instead of once per group: which groups a mini batch holds is known only once its size is chosen.
        sizes = self.sizes(model.config, head[0].size(0), sequences or input_ids.size(0), input_ids.size(1),
                           logits_to_keep, optimizer_states_allocated, vision)  # fmt: skip
        self.used.append(sizes)
        self._lengths.append(input_ids.size(1))
        plan = self._layout_plan(input_ids, attention_mask, logits_to_keep)
        logps, entropies, aux = run_log_prob_pass(
            model, decoder, head, input_ids, attention_mask, logits_to_keep, sizes, backend=self.backend,
            offloader=self.offloader if self.offload else None, compute_entropy=compute_entropy,
            temperature=temperature, transform=transform, autocast=autocast, aux_loss=aux_loss, aux_group=sequences,
            images=images, layers=layers, layout=plan,
        )  # fmt: skip
        if plan is None and self.layout != "padded":
            # A batch that fell back keeps the layout's values where TRL's mask is 0, so that log-probs of one batch
            # from passes that did and did not fall back (old, reference and current) agree there too.
            logps = zero_padding(logps, attention_mask, logits_to_keep)
            entropies = None if entropies is None else zero_padding(entropies, attention_mask, logits_to_keep)
        return logps, entropies, aux

    def _layout_plan(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
    ) -> LayoutPlan | None:
        """The `training_layout` plan of this batch; `None` for the padded pass (the setting, or a batch the layout
        cannot take: the reason is logged once per run)."""
        if self.layout == "padded":
            return None
        plan = plan_layout(self.layout, input_ids, attention_mask, logits_to_keep)
        if isinstance(plan, LayoutPlan):
            return plan
        if plan not in self.fallbacks:
            self.fallbacks.add(plan)
            logger.warning(
                "training_layout=%r: a batch runs the padded pass, as %s (same log-probs, padding computed).",
                self.layout, plan,
            )  # fmt: skip
        return None


def mini_batch_bounds(sequences: int, mini_batch: int) -> list[tuple[int, int]]:
    """`(start, end)` of each decoder pass over `sequences` sequences, `mini_batch` at a time (the last one shorter).

    Example:
        >>> mini_batch_bounds(5, 2)
        [(0, 2), (2, 4), (4, 5)]
    """
    return [(start, min(start + mini_batch, sequences)) for start in range(0, sequences, mini_batch)]


def run_log_prob_pass(
    model: torch.nn.Module,
    decoder: torch.nn.Module,
    head: tuple[torch.Tensor, torch.Tensor | None],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    sizes: ChunkSizes,
    *,
    backend: str = "auto",
    offloader: CheckpointOffloader | None = None,
    compute_entropy: bool = False,
    temperature: float = 1.0,
    transform: LogitTransform = _NO_TRANSFORM,
    autocast: Callable[[], Any] | None = None,
    aux_loss: RouterAuxLoss | None = None,
    aux_group: int | None = None,
    images: ImageInputs | None = None,
    layers: torch.nn.Module | None = None,
    layout: LayoutPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The pass itself, by `sizes`: `sizes.grpo_mini_batch` sequences at a time through the decoder (checkpoints
    offloaded with `offloader`, MLPs in `sizes.tiled_mlp_chunks` tiles, both on the layers of `layers`, default
    `model`), each with its sequences' `images`, then the fused lm_head + log-softmax in chunks of
    `sizes.logit_chunk_tokens` tokens (torch backend); with `aux_loss`, its mean over groups of `aux_group` sequences
    (default: all). With a `layout` plan (`training_layout.plan_layout`), each mini batch takes the rows
    `layout.order[start:end]` packed into one row (`training_layout.PackedRows`) instead of its padded rows, the
    lm_head runs on its completion tokens only, and the results are placed back in TRL's `[B, logits_to_keep]`
    layout and row order (0 where TRL's mask is 0). See `LogProbPass.__call__` for the other arguments."""
    weight, bias = head
    layers = model if layers is None else layers
    all_logps, all_entropies = [], []
    aux = None if aux_loss is None else RouterAuxLossMean(aux_loss, aux_group or input_ids.size(0))
    router_logits = {"output_router_logits": True} if aux is not None else {}
    if layout is not None and (aux is not None or images is not None):
        raise ValueError(f"The {layout.layout} layout takes no router aux loss and no images (layout_problem).")
    for start, end in mini_batch_bounds(input_ids.size(0), sizes.grpo_mini_batch):
        packed = layout.mini_batch(input_ids, start, end) if layout is not None else None
        if packed is not None and packed.tokens == 0:  # no completion token among these rows: nothing to score
            all_logps.append(input_ids.new_zeros((end - start, logits_to_keep), dtype=torch.float32))
            all_entropies += all_logps[-1:] if compute_entropy else []
            continue
        ids, mask = input_ids[start:end], attention_mask[start:end]
        image_inputs = images.batch(start, end) if images is not None else {}
        with (
            autocast() if autocast is not None else contextlib.nullcontext(),
            offloader.offload(layers) if offloader is not None else contextlib.nullcontext(),
            tile_mlps(layers, sizes.tiled_mlp_chunks),
        ):
            if packed is None:
                decoded = decoder(input_ids=ids, attention_mask=mask, use_cache=False, **router_logits, **image_inputs)
            else:
                inputs = packed.decoder_inputs(decoder.config, decoder.get_input_embeddings().weight.dtype)
                decoded = decoder(**inputs, use_cache=False)
            if aux is not None:
                aux.add(decoded.router_logits, mask)
        hidden = decoded.last_hidden_state
        del decoded
        if packed is None:
            # Position t predicts token t + 1: the completion's tokens are predicted by the positions just before.
            hidden, targets = hidden[:, -logits_to_keep - 1 : -1], ids[:, -logits_to_keep:]
        else:
            hidden, targets = hidden[0, packed.predictors], packed.targets
        outputs = selective_logprobs(
            hidden.to(weight.dtype), weight, targets, bias=bias, temperature=temperature,
            logit_scale=transform.logit_scale, logit_divisor=transform.logit_divisor, softcap=transform.softcap,
            return_entropy=compute_entropy, backend=backend, chunk_size=sizes.logit_chunk_tokens,
        )  # fmt: skip
        logps, entropies = outputs if compute_entropy else (outputs, None)
        all_logps.append(logps if packed is None else packed.place(logps))
        if compute_entropy:
            all_entropies.append(entropies if packed is None else packed.place(entropies))
    logps = _in_trl_order(torch.cat(all_logps, dim=0), layout)
    entropies = _in_trl_order(torch.cat(all_entropies, dim=0), layout) if compute_entropy else None
    if aux is None:
        return logps, entropies, None
    with autocast() if autocast is not None else contextlib.nullcontext():  # as the groups completed in a pass
        return logps, entropies, aux.mean()


def _in_trl_order(values: torch.Tensor, layout: LayoutPlan | None) -> torch.Tensor:
    """Rows of `values`, taken in `layout.order`, put back in TRL's order."""
    if layout is None or not layout.reordered:
        return values
    inverse = torch.empty(len(layout.order), dtype=torch.long)
    inverse[list(layout.order)] = torch.arange(len(layout.order))
    return values.index_select(0, inverse.to(values.device))


def _offload_setting(args: Any, device: torch.device) -> bool:
    """`offload_checkpoints` with `None` resolved: on when training on CUDA with gradient checkpointing."""
    if args.offload_checkpoints is None:
        return bool(args.gradient_checkpointing) and device.type == "cuda"
    return args.offload_checkpoints
