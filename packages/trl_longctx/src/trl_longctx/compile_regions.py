"""Regional `torch.compile` of a Hugging Face causal LM: each decoder layer compiled, everything around it eager.

All decoder layers of a model share one class and one `forward` code object, so dynamo compiles the layer once and
every layer reuses the graph (parameters are graph inputs): compile time is that of one layer, not of the model.
Only the layer's own `nn.Module._call_impl` is compiled; transformers' `GradientCheckpointingLayer.__call__`, which
calls `self._gradient_checkpointing_func(...)` around it, stays eager. So `CheckpointOffloader.offload` and
`tile_mlps`, which both swap that function per step, keep working and cause no recompilation: the checkpoint (and
its saved-tensor hooks) sees the compiled layer as one autograd node, and the recompute in the backward calls the
same compiled graph again.

Tiled MLPs (`trl_longctx.memory.tile_mlps` with more than one tile) run outside the compiled region: the tiled
forward is `torch.compiler.disable`d, so a layer splits into two graphs around its eager, tiled MLP (one graph break
per layer and step, no recompilation). Traced inline, the tiled forward would be guarded on the identity of its
per-step, per-layer object: one recompilation per layer and per step, until dynamo's recompile limit (8) sends the
layer back to eager. Untiled MLPs (the planner's choice whenever the step fits) are compiled with the layer.

Forwards with a KV cache (`past_key_values` set: transformers' `generate` in TRL's rollouts without vLLM) run the
eager layer: decoding one token at a time against a growing cache would recompile for little gain.

The settings (`COMPILE_SETTINGS`) trade a one-time compilation, and a recompilation at each new sequence length
unless the sequence dimension is dynamic, against a faster steady-state step; not compiling (`None`) stays the
default. Their names are those `LongContextGRPOConfig.compile_decoder_layers` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model_heads import decoder_and_lm_head


@dataclass(frozen=True)
class CompileSetting:
    """One way of compiling the decoder for the training path.

    Args:
        name: Key in `COMPILE_SETTINGS`.
        scope: `"layers"` (each decoder layer compiled, one shared graph) or `"model"` (the whole decoder
            `[B, T] ids -> [B, T, H]` hidden states under one `torch.compile`, as TRL's `torch_compile=True` compiles
            a whole model).
        dynamic: `torch.compile`'s `dynamic`: `None` compiles static shapes first and recompiles once with dynamic
            ones when a shape changes (automatic dynamic); `True` compiles every input dimension dynamic at once.
        mark_sequence_dynamic: Mark the sequence dimension of the layer's tensor inputs dynamic before each call
            (`torch._dynamo.maybe_mark_dynamic`), so the first compile is already dynamic in `T` only (the batch
            and model dimensions stay static).
        mode: `torch.compile`'s `mode` (`None` is inductor's default).
        backend: `torch.compile`'s `backend`.
    """

    name: str
    scope: str
    dynamic: bool | None = None
    mark_sequence_dynamic: bool = False
    mode: str | None = None
    backend: str = "inductor"

    def compile_kwargs(self) -> dict:
        """Keyword arguments of `torch.compile` for this setting."""
        return {"dynamic": self.dynamic, "mode": self.mode, "backend": self.backend}


COMPILE_SETTINGS: dict[str, CompileSetting] = {
    s.name: s
    for s in (
        CompileSetting("layers", "layers"),
        CompileSetting("layers-dynamic", "layers", dynamic=True),
        CompileSetting("layers-mark-dynamic", "layers", mark_sequence_dynamic=True),
        CompileSetting("layers-max-autotune-no-cudagraphs", "layers", mode="max-autotune-no-cudagraphs"),
        CompileSetting("model", "model"),
    )
}


def get_compile_setting(setting: str | CompileSetting) -> CompileSetting:
    """The `CompileSetting` named `setting` (a `CompileSetting` is returned as is).

    Raises:
        ValueError: If `setting` is not one of `COMPILE_SETTINGS` (the message lists them, and `None` for not
            compiled).
    """
    if isinstance(setting, CompileSetting):
        return setting
    if not isinstance(setting, str) or setting not in COMPILE_SETTINGS:
        raise ValueError(
            f"compile setting must be None (not compiled) or one of {list(COMPILE_SETTINGS)}, got {setting!r}."
        )
    return COMPILE_SETTINGS[setting]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (or PEFT wrapper), in order.

    Raises:
        TypeError: If the model has no `GradientCheckpointingLayer` (transformers' base class of decoder layers).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder, _ = decoder_and_lm_head(model)
    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise TypeError(f"{type(decoder).__name__} has no decoder layers (transformers GradientCheckpointingLayer).")
    return layers


def compile_decoder_layers(model: nn.Module, setting: str | CompileSetting | None) -> int:
    """Compile the decoder of `model` in place as `setting` says; the model is used as before.

    Args:
        model: A transformers causal LM, with or without a PEFT (LoRA) wrapper, gradient checkpointing, offloaded
            checkpoints or tiled MLPs. Compilation happens lazily, at the first forward of each new shape.
        setting: A name in `COMPILE_SETTINGS`, a `CompileSetting`, or `None`: not compiled (the model is left as it
            is).

    Returns:
        The number of modules compiled: one per decoder layer for `"layers*"`, 1 for `"model"`, 0 for `None`.

    Raises:
        ValueError: If the setting name is unknown.
        RuntimeError: If the decoder (or one of its layers) is already compiled.

    Example:
        >>> model = get_peft_model(model, LoraConfig(r=32, target_modules="all-linear"))
        >>> compile_decoder_layers(model, "layers")
        36
    """
    if setting is None:
        return 0
    setting = get_compile_setting(setting)
    decoder, _ = decoder_and_lm_head(model)
    layers = decoder_layers(model)
    targets = [decoder] if setting.scope == "model" else layers
    if any(m._compiled_call_impl is not None for m in [decoder, *layers]):
        raise RuntimeError(f"{type(decoder).__name__} is already compiled; compile_decoder_layers applies once.")
    for module in targets:
        compiled = torch.compile(module._call_impl, **setting.compile_kwargs())
        # `nn.Module._wrapped_call_impl` (the module's `__call__`) runs `_compiled_call_impl` when set; that is how
        # `nn.Module.compile` installs it, here with the KV-cache dispatch and the optional dynamic marking.
        module._compiled_call_impl = _CompiledCall(compiled, module._call_impl, setting.mark_sequence_dynamic)
    return len(targets)


class _CompiledCall:
    """A module's call: the compiled `_call_impl` for cache-free forwards, the eager one when a KV cache is passed."""

    def __init__(self, compiled, eager, mark_sequence_dynamic: bool):
        self.compiled = compiled
        self.eager = eager
        self.mark_sequence_dynamic = mark_sequence_dynamic

    def __call__(self, *args, **kwargs):
        if kwargs.get("past_key_values") is not None:
            return self.eager(*args, **kwargs)
        if self.mark_sequence_dynamic:
            _mark_sequence_dynamic(args, kwargs)
        return self.compiled(*args, **kwargs)


def _mark_sequence_dynamic(args: tuple, kwargs: dict) -> None:
    """Mark the sequence dimension `T` dynamic on the tensor inputs of a decoder layer (or decoder).

    `T` is dimension 1 of the first input (`hidden_states [B, T, H]` or `input_ids [B, T]`). Marked where their size
    is `T`: dimension 0 of 1-D tensors (`cache_position [T]`), 1 of 2-D and 3-D ones (`position_ids [B, T]`,
    rotary `cos`/`sin [B, T, D]`), 2 and 3 of 4-D ones (attention mask `[B, 1, T, T]`).
    """
    first = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        return
    length = first.shape[1]
    dims_by_rank = {1: (0,), 2: (1,), 3: (1,), 4: (2, 3)}
    for value in (*args, *kwargs.values()):
        for tensor in value if isinstance(value, (tuple, list)) else (value,):
            if not isinstance(tensor, torch.Tensor):
                continue
            for dim in dims_by_rank.get(tensor.dim(), ()):
                if tensor.shape[dim] == length:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
