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


def tiled_forward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunks: int) -> torch.Tensor:
    """Apply a token-wise `forward` to `x` in `chunks` tiles of its flattened tokens, checkpointing each tile.

    Args:
        forward: Token-wise function `[n, H] -> [n, H_out]` (an MLP module's own forward).
        x: Input `[..., H]`, any dtype and device; its `N = prod(x.shape[:-1])` tokens are split into tiles of
            `ceil(N / chunks)` (the last one shorter when `chunks` does not divide `N`).
        chunks: Number of tiles, `>= 1`; 1 (or `N <= 1`) calls `forward(x)` unchanged.

    Returns:
        `[..., H_out]`, equal to `forward(x)` up to the rounding of the smaller matmuls.

    Example:
        >>> y = tiled_forward(model.model.layers[0].mlp.forward, hidden, chunks=4)
    """
    tokens = math.prod(x.shape[:-1])
    if chunks <= 1 or tokens <= 1:
        return forward(x)
    tiles = x.reshape(tokens, x.shape[-1]).split(math.ceil(tokens / chunks))
    if torch.is_grad_enabled():
        # Non-reentrant: saves the tile input only, and lets the parameters the forward uses (which are not inputs
        # here) receive their gradients through the recomputed graph.
        outputs = [checkpoint(forward, tile, use_reentrant=False) for tile in tiles]
    else:
        outputs = [forward(tile) for tile in tiles]  # no graph: tiling only bounds the transient intermediates
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


@contextlib.contextmanager
def _installed(forwards: list[_TiledMLPForward]) -> Iterator[None]:
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


def _with_tiled_mlps(checkpoint_func: Callable, forwards: list[_TiledMLPForward]) -> Callable:
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
    """Run the gate/up/down MLPs of `model` sequence-tiled inside this block (and in the backward of its forwards).

    Args:
        model: A transformers model or PEFT wrapper (Llama, Qwen2, Qwen3, Mistral, Gemma2, Gemma3 and other models
            whose MLPs have `gate_proj`, `up_proj`, `down_proj` and `act_fn`), with or without gradient
            checkpointing and LoRA.
        chunks: Tiles per MLP call, over the flattened `B * T` tokens: an `int >= 1` (1 is a no-op) or `None` to
            pick per call with `auto_mlp_chunks` from the call's token count.

    Yields:
        The number of MLP modules tiled.

    Raises:
        ValueError: If `chunks` is not a positive int or None, or `chunks > 1` and the model has no such MLP.
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
    mlps = [m for m in model.modules() if _is_mlp(m)]
    if any(isinstance(m.__dict__.get("forward"), _TiledMLPForward) for m in mlps):
        raise RuntimeError("tile_mlps is already active on this model; nested tiling is not supported.")
    if not mlps:
        if chunks is not None:
            raise ValueError(
                f"tiled MLP chunks={chunks} but {type(model).__name__} has no MLP with {', '.join(_MLP_PARTS)}."
            )
        _warn_no_mlp(type(model).__name__)
        yield 0
        return
    forwards = [_TiledMLPForward(m, chunks) for m in mlps]
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


def _checkpointed_layers(model: nn.Module, forwards: list[_TiledMLPForward]) -> list[tuple[nn.Module, list]]:
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
    logger.warning("Automatic MLP tiling: %s has no gate/up/down MLP; its MLPs run untiled.", model_class)
