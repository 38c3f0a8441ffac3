"""Sequence-tiled MLP: the decoder MLPs run over tiles of the tokens, so backward holds one tile's intermediates.

Without tiling, the recompute of one checkpointed decoder layer saves the MLP's gate, up, activation and product
outputs for its backward: four `[N, I]` tensors (`N = B * T` tokens, `I` the intermediate size), plus two or three
`[N, I]` gradients while the backward runs. For Qwen3-8B (`I = 12,288`) at 2 x 32,768 tokens that is about
6 x 1.5 GiB in bf16, against 0.5 GiB for the layer's hidden state `[N, H]`.

`tiled_forward` runs an MLP's own forward on tiles of the flattened tokens, each under a non-reentrant
`torch.utils.checkpoint`: a tile keeps only its input `[tile, H]` (a view of the layer's) and recomputes its
intermediates in its own backward, so at most one tile's `[tile, I]` tensors are alive. The tiles call the module's
forward, so PEFT LoRA layers and any other parameter the forward uses get their gradients through autograd as usual
(no parameter has to be passed in, unlike a custom `autograd.Function`), and `torch.autograd.grad`, DDP and FSDP2
hooks see an ordinary graph.

`tile_mlps(model, chunks)` installs that forward on every gate/up/down MLP of the model for a block of code. The
backward usually runs after the block, and with gradient checkpointing it recomputes each decoder layer then: the
layer's checkpointed function is therefore wrapped so that the recompute runs with the same tiled MLPs as the forward
(the same tensors saved in the same order, as non-reentrant checkpointing requires).

Cost: each tile runs forward once more, in its own backward. The layer's recompute stops early (torch's default) once
it has saved the last tile's input, so it skips the last tile: `(chunks - 1) / chunks` of an extra MLP forward per
layer and step (counted: 3 + 4 tile forwards in the backward of a layer in 4 tiles). Small tiles are slow (each
tile's matmuls get thinner while the fixed costs stay), hence
`tile_mlps(model, None)` tiles only where the intermediates dominate the layer's memory (`auto_mlp_chunks`);
`LongContextGRPOTrainer` instead asks the memory planner for the fewest tiles that fit (none when untiled fits).

Mixture-of-Experts layers: the sparse block (Qwen3-MoE's `Qwen3MoeSparseMoeBlock`, gpt-oss's `GptOssMLP`, Mixtral's
`MixtralSparseMoeBlock`, ...) runs its router on all `N` tokens, then calls its experts module with the rows
`(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k])`. Transformers' experts interface
(`transformers.integrations.moe.use_experts_implementation`: eager, `grouped_mm`, `batched_mm`, ...) fixes that
call, and what it holds per token is `k` rows of everything: the gathered inputs `[N * k, H]`, the gate/up output
`[N * k, 2 I_e]`, the per-expert outputs `[N * k, H]`. `tile_mlps` tiles that experts call: its three row-aligned
arguments are split into the same tiles, so each token's experts, routing weights and output are unchanged. The
router is not tiled: it runs once per layer and pass, so transformers' output recorder (`_can_record_outputs`, which
hooks the router module) still records one `[N, experts]` tensor of router logits per MoE layer, rows in token
order, which the router aux loss reads. The tiled module is the one the block calls: with PEFT `target_parameters`
LoRA on the expert weights that is the outermost `ParamWrapper`, whose forward adds the adapter to the weights for
the length of the call, so each tile (and its recompute in the backward) runs with the adapter, at the cost of
forming the adapted expert weights once per tile instead of once per layer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

# The gate/up/down MLP of Llama, Qwen2, Qwen3, Mistral, Gemma2, Gemma3 (and many more): token-wise, so tiling the
# tokens changes nothing but the memory.
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")
# Automatic tiling starts where one `[N, I]` tensor holds 2**27 elements (256 MiB in bf16): the untiled MLP then
# holds about 6 x 256 MiB = 1.5 GiB per layer in its backward. Below that the saving is small against the extra compute.
_AUTO_MIN_ELEMENTS = 2**27
_MISSING = object()


def auto_mlp_chunks(tokens: int, hidden_size: int, intermediate_size: int) -> int:
    """Number of tiles `tile_mlps(model, None)` uses for `tokens` flattened tokens.

    The fewest tiles whose `[tile, I]` tensor holds at most `max(2**27, N * H)` elements. Smaller tiles would buy
    little: below 2**27 elements (256 MiB in bf16) the whole untiled MLP costs ~1.5 GiB, and below the size of the
    hidden state `[N, H]` the MLP no longer sets the layer's peak (its recompute holds several `[N, H]` tensors). With
    `I / H` about 3 to 5.5 in current models this is 1 tile up to ~11K tokens for Qwen3-8B (`H = 4,096`,
    `I = 12,288`), 2 at 16K, and `ceil(I / H) = 3` from 22K tokens on.

    Args:
        tokens: Flattened tokens `N = B * T` of one MLP call.
        hidden_size, intermediate_size: `H` and `I` of the MLP.

    Returns:
        An `int >= 1`; 1 means no tiling.
    """
    elements = tokens * intermediate_size
    return max(1, math.ceil(elements / max(_AUTO_MIN_ELEMENTS, tokens * hidden_size)))


def tiled_forward(
    forward: Callable[..., torch.Tensor], x: torch.Tensor, chunks: int, *rows: torch.Tensor
) -> torch.Tensor:
    """Apply a token-wise `forward` to `x` in `chunks` tiles of its flattened tokens, checkpointing each tile.

    Args:
        forward: Token-wise function `[n, H] -> [n, H_out]` (an MLP module's own forward), or with `rows`
            `([n, H], *rows' tiles) -> [n, H_out]` (an experts module's forward).
        x: Input `[..., H]`, any dtype and device; its `N = prod(x.shape[:-1])` tokens are split into tiles of
            `ceil(N / chunks)` (the last one shorter when `chunks` does not divide `N`).
        chunks: Number of tiles, `>= 1`; 1 (or `N <= 1`) calls `forward(x, *rows)` unchanged.
        *rows: Tensors with one row per token of `x` (`[N, ...]`: an experts module's top-k indices and weights),
            split into the same tiles and passed after `x`'s tile.

    Returns:
        `[..., H_out]`, equal to `forward(x, *rows)` up to the rounding of the smaller matmuls.

    Raises:
        ValueError: A tensor of `rows` does not have `N` rows.

    Example:
        >>> y = tiled_forward(model.model.layers[0].mlp.forward, hidden, chunks=4)
    """
    tokens = math.prod(x.shape[:-1])
    if bad := [tuple(r.shape) for r in rows if r.dim() == 0 or r.size(0) != tokens]:
        raise ValueError(f"tiled_forward: every row tensor needs {tokens} rows (one per token of x), got {bad}.")
    if chunks <= 1 or tokens <= 1:
        return forward(x, *rows)
    size = math.ceil(tokens / chunks)
    tiles = list(zip(x.reshape(tokens, x.shape[-1]).split(size), *(r.split(size) for r in rows), strict=True))
    if torch.is_grad_enabled():
        # Non-reentrant: saves the tile inputs only, and lets the parameters the forward uses (which are not inputs
        # here) receive their gradients through the recomputed graph.
        outputs = [checkpoint(forward, *tile, use_reentrant=False) for tile in tiles]
    else:
        outputs = [forward(*tile) for tile in tiles]  # no graph: tiling only bounds the transient intermediates
    return torch.cat(outputs).view(*x.shape[:-1], -1)


class _TiledMLPForward:
    """The forward installed on one MLP module: its original forward, run by `tiled_forward`."""

    def __init__(self, module: nn.Module, chunks: int | None):
        self.module = module
        self.original = module.forward
        self.chunks = chunks
        self.intermediate_size = getattr(module, "intermediate_size", None) or module.gate_proj.out_features

    # Eager inside a compiled decoder layer (`trl_longctx.compile_regions`): one graph break instead of a guard on
    # this per-step, per-layer object, which would recompile the layer for every layer and step.
    @torch.compiler.disable
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self.chunks
        if chunks is None:
            chunks = auto_mlp_chunks(math.prod(x.shape[:-1]), x.shape[-1], self.intermediate_size)
        return tiled_forward(self.original, x, chunks)


class _TiledExpertsForward:
    """The forward installed on one experts module (the one its MoE block calls): its original forward, run by
    `tiled_forward` over the rows of `(hidden_states, top_k_index, top_k_weights)`."""

    def __init__(self, module: nn.Module, chunks: int | None):
        self.module = module
        self.original = module.forward
        self.chunks = chunks
        self.base = _base_layer(module)

    @torch.compiler.disable  # as `_TiledMLPForward.__call__`
    def __call__(self, *args: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs or len(args) != 3 or not all(isinstance(a, torch.Tensor) and a.dim() == 2 for a in args):
            described = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
            raise ValueError(
                f"tile_mlps: {type(self.base).__name__} was called with positional arguments {described} and keywords "
                f"{sorted(kwargs)}; tiling its tokens needs the experts interface's call (hidden_states [N, H], "
                "top_k_index [N, k], top_k_weights [N, k]). tiled_mlp_chunks=1 runs it untiled."
            )
        hidden, index, weights = args
        chunks = self.chunks
        if chunks is None:
            # Per token the experts hold k rows of the expert MLP: k * I_e intermediate values.
            chunks = auto_mlp_chunks(hidden.size(0), hidden.size(1), index.size(1) * _expert_intermediate(self.base))
        return tiled_forward(self.original, hidden, chunks, index, weights)


@functools.cache
def _experts_interface_code():
    """The code object of the forward `use_experts_implementation` gives every experts class it decorates (one code
    object, a closure per class): what identifies an experts module whatever its class."""
    from transformers.integrations.moe import use_experts_implementation

    class _Probe(nn.Module):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise NotImplementedError

    return use_experts_implementation(_Probe).forward.__code__


def _base_layer(module: nn.Module) -> nn.Module:
    """The module under PEFT's wrappers (`base_layer`, nested for several `target_parameters` of one module)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _is_experts(module: nn.Module) -> bool:
    return getattr(type(module).forward, "__code__", None) is _experts_interface_code()


def _expert_intermediate(experts: nn.Module) -> int:
    """`I_e`, the intermediate size of one expert (`intermediate_dim` in most families, gpt-oss's
    `intermediate_size`)."""
    size = getattr(experts, "intermediate_dim", None) or getattr(experts, "intermediate_size", None)
    if not isinstance(size, int):
        raise ValueError(
            f"Automatic MLP tiling: {type(experts).__name__} has no integer intermediate_dim or intermediate_size to "
            "size its tiles by; set tiled_mlp_chunks to a number."
        )
    return size


def _tiled_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The gate/up/down MLPs of `model`, and the experts modules its MoE blocks call (the outermost PEFT wrapper of
    each: `model.modules()` visits a wrapper before what it wraps)."""
    mlps, experts, seen = [], [], set()
    for module in model.modules():
        if _is_mlp(module):
            mlps.append(module)
            continue
        base = _base_layer(module)
        if id(base) not in seen and _is_experts(base):
            seen.add(id(base))
            experts.append(module)
    return mlps, experts


@contextlib.contextmanager
def _installed(forwards: list[_TiledMLPForward | _TiledExpertsForward]) -> Iterator[None]:
    """Make `forwards` the modules' forwards for the block, then put back whatever was there (stack-like)."""
    saved = [f.module.__dict__.get("forward", _MISSING) for f in forwards]
    for f in forwards:
        f.module.forward = f
    try:
        yield
    finally:
        for f, previous in zip(forwards, saved, strict=True):
            if previous is _MISSING:
                del f.module.forward
            else:
                f.module.forward = previous


def _with_tiled_mlps(checkpoint_func: Callable, forwards: list[_TiledMLPForward | _TiledExpertsForward]) -> Callable:
    """Wrap a layer's `_gradient_checkpointing_func` so the layer's forward and its recompute both tile the MLPs."""

    def tiled_checkpoint(function, *args, **kwargs):
        def run(*inner_args, **inner_kwargs):
            with _installed(forwards):
                return function(*inner_args, **inner_kwargs)

        return checkpoint_func(run, *args, **kwargs)

    return tiled_checkpoint


def _is_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, part) for part in _MLP_PARTS) and isinstance(module.gate_proj, nn.Module)


@contextlib.contextmanager
def tile_mlps(model: nn.Module, chunks: int | None = None) -> Iterator[int]:
    """Run the MLPs of `model` sequence-tiled inside this block (and in the backward of its forwards).

    Args:
        model: A transformers model or PEFT wrapper, with or without gradient checkpointing and LoRA: Llama, Qwen2,
            Qwen3, Mistral, Gemma2, Gemma3 and other models whose MLPs have `gate_proj`, `up_proj`, `down_proj` and
            `act_fn`; and Mixture-of-Experts models whose experts use transformers' experts interface (Qwen3-MoE,
            gpt-oss, Mixtral, ...), tiled at the experts call (module docstring), their router untiled.
        chunks: Tiles per MLP or experts call, over the flattened `B * T` tokens: an `int >= 1` (1 is a no-op) or
            `None` to pick per call with `auto_mlp_chunks` from the call's token count (for experts, `k` times the
            expert intermediate size as the intermediate size).

    Yields:
        The number of MLP and experts modules tiled.

    Raises:
        ValueError: If `chunks` is not a positive int or None, or `chunks > 1` and the model has no such MLP; at the
            forward, if an experts module is called otherwise than the experts interface calls it.
        RuntimeError: If the MLPs are already tiled (nested `tile_mlps` on one model).

    Example:
        >>> model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        >>> with tile_mlps(model, chunks=4):
        ...     loss = model(input_ids).logits.float().logsumexp(-1).mean()
        >>> loss.backward()  # the recompute of each layer still tiles its MLP
    """
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks must be a positive integer or None (automatic), got {chunks!r}.")
    if chunks == 1:
        yield 0
        return
    mlps, experts = _tiled_modules(model)
    if any(isinstance(m.__dict__.get("forward"), (_TiledMLPForward, _TiledExpertsForward)) for m in mlps + experts):
        raise RuntimeError("tile_mlps is already active on this model; nested tiling is not supported.")
    if not mlps and not experts:
        if chunks is not None:
            raise ValueError(
                f"tiled MLP chunks={chunks} but {type(model).__name__} has no MLP with {', '.join(_MLP_PARTS)} and no "
                "experts module of transformers' experts interface."
            )
        _warn_no_mlp(type(model).__name__)
        yield 0
        return
    forwards = [_TiledMLPForward(m, chunks) for m in mlps] + [_TiledExpertsForward(m, chunks) for m in experts]
    layers = _checkpointed_layers(model, forwards)
    originals = [layer.__dict__["_gradient_checkpointing_func"] for layer, _ in layers]
    for (layer, inside), original in zip(layers, originals, strict=True):
        layer._gradient_checkpointing_func = _with_tiled_mlps(original, inside)
    try:
        with _installed(forwards):
            yield len(forwards)
    finally:
        for (layer, _), original in zip(layers, originals, strict=True):
            layer._gradient_checkpointing_func = original


def _checkpointed_layers(model: nn.Module, forwards: list) -> list[tuple[nn.Module, list]]:
    """Layers with a checkpointing function (set by `gradient_checkpointing_enable`) and the tiled MLPs inside each."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = []
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and "_gradient_checkpointing_func" in layer.__dict__:
            inside = {id(m) for m in layer.modules()}
            tiled = [f for f in forwards if id(f.module) in inside]
            if tiled:
                layers.append((layer, tiled))
    return layers


@functools.cache
def _warn_no_mlp(model_class: str) -> None:
    logger.warning(
        "Automatic MLP tiling: %s has no gate/up/down MLP nor experts module; nothing is tiled.", model_class
    )
