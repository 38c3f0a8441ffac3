"""``shared_hf_model``: a transformers model whose frozen weights are views of vLLM's weight tensors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from vllm_standby import _worker
from vllm_standby.fp8_linear import Fp8Linear
from vllm_standby.shared_4bit import Packed4bitShard, is_packed_4bit, linear_4bit_view, split_packed_4bit
from vllm_standby.shared_experts import (
    EXPERT_LAYOUTS,
    ExpertLayout,
    expert_layout,
    expert_views,
    hf_module_name,
    is_expert_module,
    verify_first_expert,
)
from vllm_standby.shared_fp8 import Fp8Shard, check_not_repacked, is_fp8_layer, split_fp8_layer

logger = logging.getLogger(__name__)


def _vllm_model(llm: Any) -> torch.nn.Module:
    core = type(llm.llm_engine.engine_core).__name__
    if core != "InprocClient":
        raise RuntimeError(
            f"shared_hf_model needs vLLM's engine in this process (engine client: {core}); set "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 before creating the LLM (TRL colocate mode does)"
        )
    models = llm.collective_rpc(_worker.model_of)
    if len(models) != 1:
        raise RuntimeError(f"shared_hf_model supports one worker (tensor parallel 1), got {len(models)}")
    return models[0]


def _hf_parts(module_name: str, packed: dict, layout: ExpertLayout | None) -> tuple[str, str, list[str] | None]:
    """`(hf_module_name, prefix, parts)` of a vLLM module: its checkpoint name, the name up to its last part, and the
    checkpoint modules it packs (`["q_proj", "k_proj", "v_proj"]` for `qkv_proj`; `None` when unpacked)."""
    # With enable_lora, vLLM wraps layers: `qkv_proj.base_layer.weight` holds the base weight.
    hf_name = hf_module_name(module_name, layout)
    packed_name = hf_name.rpartition(".")[2]
    parts = packed.get(packed_name)
    # A module packed from one checkpoint module of its own name (a vision tower's `qkv`) is not cut.
    return hf_name, hf_name[: -len(packed_name)], None if parts == [packed_name] else parts


def _split_packed(
    vllm_params: dict[str, torch.Tensor], vllm_model: torch.nn.Module, model_type: str
) -> dict[str, torch.Tensor | Packed4bitShard | Fp8Shard]:
    """Name -> tensor in the checkpoint's naming: packed weights (qkv_proj, gate_up_proj) cut into row views; a
    bitsandbytes 4-bit weight becomes its shards (packed codes + quantization state, see `shared_4bit`), an FP8
    weight its shards (FP8 rows + their scales, see `shared_fp8`); fused MoE experts their transformers parameters
    (see `shared_experts`)."""
    packed = getattr(vllm_model, "packed_modules_mapping", {}) or {}
    modules = dict(vllm_model.named_modules())
    layout = EXPERT_LAYOUTS.get(model_type)
    views: dict[str, torch.Tensor | Packed4bitShard | Fp8Shard] = {}
    fp8_modules, expert_modules = set(), set()
    for module_name, module in modules.items():
        if is_expert_module(module):
            views.update(expert_views(module, module_name, expert_layout(model_type)))
            expert_modules.add(module_name)
            continue
        check_not_repacked(module, module_name)
        if not is_fp8_layer(module):
            continue
        fp8_modules.add(module_name)
        hf_name, prefix, parts = _hf_parts(module_name, packed, layout)
        parts = parts or [hf_name.rpartition(".")[2]]
        shards = split_fp8_layer(module, module_name)
        if len(shards) != len(parts):
            raise RuntimeError(f"cannot split FP8 {module_name} into {parts}: {len(shards)} shards")
        views.update({f"{prefix}{part}.weight": shard for part, shard in zip(parts, shards, strict=True)})
    for name, param in vllm_params.items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in fp8_modules and leaf != "bias" or module_name in expert_modules:
            continue  # the FP8 weight and its scales, the experts: viewed above
        hf_name, prefix, parts = _hf_parts(module_name, packed, layout)
        packed_name = hf_name.rpartition(".")[2]
        if is_packed_4bit(param):
            shards = split_packed_4bit(param)
            parts = parts or [packed_name]
            if len(shards) != len(parts):
                raise RuntimeError(f"cannot split 4-bit {name} into {parts}: {len(shards)} shards")
            views.update({f"{prefix}{part}.{leaf}": shard for part, shard in zip(parts, shards, strict=True)})
            continue
        # detach(): plain tensors sharing storage (vLLM parameters are subclasses that Parameter() refuses to wrap).
        tensor = param.detach()
        if not parts:
            views[f"{hf_name}.{leaf}"] = tensor
            continue
        sizes = list(modules[module_name].output_partition_sizes)
        if len(sizes) != len(parts) or sum(sizes) != tensor.shape[0]:
            raise RuntimeError(f"cannot split {name} {tuple(tensor.shape)} into {parts} of sizes {sizes}")
        for part, view in zip(parts, torch.split(tensor, sizes, dim=0), strict=True):
            views[f"{prefix}{part}.{leaf}"] = view
    return views


def _checkpoint_names(views: dict[str, Any], vllm_model: torch.nn.Module, hf_names: set[str]) -> dict[str, Any]:
    """``views`` keyed by the transformers model's names: vLLM's prefix renames undone.

    A model whose vLLM module tree differs from the checkpoint's (a vision-language model: ``language_model.model.``
    for the checkpoint's ``model.language_model.``, ``visual.`` for ``model.visual.``) declares the renames as
    ``hf_to_vllm_mapper.orig_to_new_prefix``. Several checkpoint prefixes may map to one vLLM prefix (older and newer
    checkpoint layouts); the one naming a parameter of the transformers model wins. A name no rename turns into one
    of ``hf_names`` is kept as it is (and reported missing by the caller if the transformers model needs it).
    """
    mapper = getattr(vllm_model, "hf_to_vllm_mapper", None)
    renames = sorted(
        ((new, orig) for orig, new in (getattr(mapper, "orig_to_new_prefix", None) or {}).items() if new is not None),
        key=lambda pair: -len(pair[0]),
    )
    if not renames:
        return views
    renamed = {}
    for name, view in views.items():
        candidates = [orig + name[len(new) :] for new, orig in renames if name.startswith(new)]
        renamed[next((c for c in candidates if c in hf_names), name)] = view
    return renamed


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers where they are computed.

    The parameters are replaced by views of vLLM's tensors, so they need no memory; buffers (rotary frequencies of
    the decoder and of a vision tower) are computed by each module's own ``__init__`` from arguments only it knows.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@torch.no_grad()
def shared_hf_model(llm: Any, model_cls: Any = None, *, fp8_matmul: str = "auto") -> torch.nn.Module:
    """Build the transformers model of ``llm`` whose weights are views of vLLM's tensors: one copy in memory.

    q/k/v are row slices of vLLM's ``qkv_proj``, gate/up of ``gate_up_proj``; embeddings and ``lm_head`` are cut to
    the real vocabulary (vLLM pads it). The weights are frozen (``requires_grad=False``): put PEFT LoRA on top.
    An engine built with ``quantization="bitsandbytes"`` (4-bit, vLLM 0.25-0.28) gives bitsandbytes ``Linear4bit``
    layers whose packed weights are views of vLLM's shards, each with its own quantization state (QLoRA, one copy);
    the model is then marked ``is_loaded_in_4bit`` so that PEFT puts its 4-bit LoRA layers on them.
    A Mixture-of-Experts model's fused experts are views of vLLM's (``w13_weight``, ``w2_weight``) where vLLM keeps
    the checkpoint's layout (:mod:`vllm_standby.shared_experts`: its Triton MoE kernels, architectures of
    ``EXPERT_LAYOUTS``).
    An engine that quantized the checkpoint to FP8 (``quantization="fp8_per_channel"``, ``"fp8_per_tensor"`` or
    ``"fp8_per_block"``, see :mod:`vllm_standby.shared_fp8`) gives :class:`vllm_standby.fp8_linear.Fp8Linear` layers
    (``nn.Linear`` subclasses, which PEFT's LoRA wraps) whose FP8 weights and scales are views of vLLM's.
    Writing to them in place changes vLLM's weights too (call ``llm.reset_prefix_cache()`` afterwards).

    Args:
        llm: A ``vllm.LLM`` (or :class:`vllm_standby.StandbyLLM`) running in this process, tensor parallel 1,
            unquantized, bitsandbytes 4-bit or online FP8, created with the vllm_standby patches live (so CPU weights
            stay plain).
        model_cls: transformers class to build; default from vLLM's HF config: ``AutoModelForImageTextToText`` for a
            vision-language model (its config has a ``vision_config``: the vision tower's weights are views too),
            else ``AutoModelForCausalLM``.
        fp8_matmul: The FP8 layers' matmul (``vllm_standby.fp8_linear.MATMULS``): ``"auto"`` (dequantized per
            matmul, ``vllm_standby.fp8_linear.AUTO_REASON``), ``"scaled_mm"`` or ``"dequantize"``.

    Returns:
        The transformers model in eval mode, on vLLM's device and dtype.

    Raises:
        RuntimeError: the engine runs in another process, several workers, a weight has no vLLM counterpart, a
            quantized layer's layout is unknown (e.g. FP8 repacked for the Marlin kernel), or MoE experts are laid
            out for a kernel the trainer cannot view (``shared_experts.VIEWABLE_BACKENDS``).
        ValueError: ``fp8_matmul="scaled_mm"`` where it cannot run.

    Example:
        >>> llm = vllm_standby.StandbyLLM("Qwen/Qwen3-0.6B")  # doctest: +SKIP
        >>> hf = vllm_standby.shared_hf_model(llm)  # doctest: +SKIP
        >>> peft_model = peft.get_peft_model(hf, lora_config)  # doctest: +SKIP
    """
    import transformers

    vllm_model = _vllm_model(llm)
    config = llm.llm_engine.model_config.hf_config
    dtype = llm.llm_engine.model_config.dtype
    device = next(vllm_model.parameters()).device
    if model_cls is None:
        vision = getattr(config, "vision_config", None) is not None
        model_cls = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    with _parameters_on_meta():
        hf = model_cls.from_config(config, dtype=dtype)
    views = _split_packed(dict(vllm_model.named_parameters(remove_duplicate=False)), vllm_model, config.model_type)
    views = _checkpoint_names(views, vllm_model, {name for name, _ in hf.named_parameters(remove_duplicate=False)})
    experts = sorted(name.removesuffix(".gate_up_proj") for name in views if name.endswith("experts.gate_up_proj"))
    if experts:
        unverified = verify_first_expert(views, experts[0], llm.llm_engine.model_config.model)
        if unverified is not None:
            logger.warning("Shared MoE experts: the first expert's layout was not compared with the checkpoint: %s.",
                           unverified)  # fmt: skip
    missing, quantized = [], 0
    for name, param in list(hf.named_parameters(remove_duplicate=True)):
        view = views.get(name)
        module_name, _, leaf = name.rpartition(".")
        if view is None:
            missing.append(name)
            continue
        if isinstance(view, Packed4bitShard):
            # vLLM quantized this layer: the transformers layer becomes a bitsandbytes Linear4bit on the same bytes.
            if (view.out_features, view.in_features) != tuple(param.shape):
                raise RuntimeError(f"{name}: vLLM 4-bit shape {view.quant_state.shape} vs transformers {param.shape}")
            parent_name, _, child = module_name.rpartition(".")
            bias = views.get(f"{module_name}.bias")
            hf.get_submodule(parent_name).add_module(child, linear_4bit_view(view, dtype, bias))
            quantized += 1
            continue
        if isinstance(view, Fp8Shard):
            # vLLM quantized this layer to FP8: the transformers layer becomes an Fp8Linear on the same bytes.
            if tuple(view.weight.shape) != tuple(param.shape):
                raise RuntimeError(f"{name}: vLLM FP8 shape {tuple(view.weight.shape)} vs transformers {param.shape}")
            parent_name, _, child = module_name.rpartition(".")
            layer = Fp8Linear(
                view.weight, view.scale, views.get(f"{module_name}.bias"), block_size=view.block_size,
                row_offset=view.row_offset, compute_dtype=dtype, matmul=fp8_matmul,
            )  # fmt: skip
            hf.get_submodule(parent_name).add_module(child, layer)
            continue
        if view.shape != param.shape:  # vocab padding: keep the first rows
            if view.shape[1:] != param.shape[1:] or view.shape[0] < param.shape[0]:
                raise RuntimeError(f"{name}: vLLM shape {tuple(view.shape)} vs transformers {tuple(param.shape)}")
            view = view[: param.shape[0]]
        hf.get_submodule(module_name)._parameters[leaf] = torch.nn.Parameter(view, requires_grad=False)
    if missing:
        raise RuntimeError(f"shared_hf_model: no vLLM tensor for {missing[:8]} ({len(missing)} in all)")
    if getattr(config, "tie_word_embeddings", False):
        hf.tie_weights()
    if quantized:
        # What transformers' bitsandbytes quantizer sets: PEFT then wraps these layers with its 4-bit LoRA layers.
        hf.is_loaded_in_4bit = True
    for module in hf.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return hf.eval()
