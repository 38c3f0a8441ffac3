"""Views of vLLM's fused Mixture-of-Experts weights in the layout of the transformers model: one copy of the experts.

vLLM holds the experts of each MoE layer in one module (``FusedMoE``; from vLLM 0.25 its parameters sit on
``mlp.experts.routed_experts``, before that on ``mlp.experts``): ``w13_weight`` ``[experts, 2 * intermediate, hidden]``
(each expert's gate and up rows) and ``w2_weight`` ``[experts, hidden, intermediate]``, with ``w13_bias`` / ``w2_bias``
where the architecture has biases. transformers 5.x holds them as two fused parameters of ``mlp.experts`` too
(``gate_up_proj``, ``down_proj``). Each architecture's checkpoint loader in vLLM fixes how the two relate
(:data:`EXPERT_LAYOUTS`); what is declared there is checked against the shapes of both models when the views are
made, so a layout that changed upstream fails loudly instead of training scrambled experts.

After loading, vLLM may re-lay the experts out for its MoE kernel (``process_weights_after_loading`` of
``UnquantizedFusedMoEMethod``, through ``convert_to_unquantized_kernel_format``): the Triton kernels (vLLM's choice
on Hopper and Ampere GPUs) keep the checkpoint layout; FlashInfer's CUTLASS kernels swap gate and up, its TRT-LLM
kernels and ROCm's AITER shuffle into blocks, and the CPU build prepacks for its grouped GEMM. Only
:data:`VIEWABLE_BACKENDS` are viewed; any other is refused, naming the backend. Quantized experts (FP8, MXFP4,
bitsandbytes) are refused too: their layouts are the kernels' own. Shapes cannot tell gate rows from up rows, so
:func:`verify_first_expert` also compares the first MoE layer's first expert, as viewed, with the checkpoint's tensors
on disk: a re-layout that the backend check missed fails there instead of training scrambled experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

#: vLLM's unquantized MoE backends (``UnquantizedMoeBackend`` values) that keep the checkpoint layout of the experts.
VIEWABLE_BACKENDS = ("TRITON", "BATCHED_TRITON")


@dataclass(frozen=True)
class ExpertLayout:
    """How one architecture's experts in vLLM relate to its transformers model.

    Attributes:
        transposed: transformers holds each expert's matrices as ``[in, out]`` (``x @ W``) where vLLM holds
            ``[out, in]``: the views are ``transpose(1, 2)`` of vLLM's tensors (strided, no copy).
        biases: Whether the experts have biases (``w13_bias`` -> ``gate_up_proj_bias``, ``w2_bias`` ->
            ``down_proj_bias``).
        renames: Substrings of vLLM's module names and what transformers calls them (vLLM's ``hf_to_vllm_mapper``
            of the model class, inverted).
        source: Where vLLM's loader makes this layout, and what transformers has.
    """

    transposed: bool
    biases: bool
    renames: tuple[tuple[str, str], ...]
    source: str


#: transformers ``model_type`` -> the layout of its experts in vLLM.
EXPERT_LAYOUTS = {
    "qwen3_moe": ExpertLayout(
        transposed=False,
        biases=False,
        renames=(),
        source="vLLM's Qwen3MoeForCausalLM.load_weights stacks each expert's gate_proj then up_proj rows into "
        "w13_weight [E, 2I, H] and puts down_proj in w2_weight [E, H, I]; transformers' Qwen3MoeExperts holds "
        "gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I]",
    ),
    "gpt_oss": ExpertLayout(
        transposed=True,
        biases=True,
        renames=((".attn.", ".self_attn."), ("model.embedding.", "model.embed_tokens.")),
        source="vLLM's GptOssModel loads the checkpoint's gate_up_proj [E, H, 2I] (gate and up columns interleaved) "
        "permuted to w13_weight [E, 2I, H] and down_proj [E, I, H] to w2_weight [E, H, I], biases as they are; its "
        "hf_to_vllm_mapper renames .self_attn. to .attn. and embed_tokens to embedding",
    ),
}


def is_expert_module(module: torch.nn.Module) -> bool:
    """Whether `module` holds a vLLM MoE layer's fused expert weights (``w13_weight`` among its own parameters)."""
    return "w13_weight" in getattr(module, "_parameters", {})


def hf_module_name(name: str, layout: ExpertLayout | None) -> str:
    """The transformers name of a vLLM module: vLLM's own levels dropped (``base_layer``, the LoRA wrapper's;
    ``routed_experts``) and the layout's renames applied."""
    name = ".".join(part for part in name.split(".") if part not in ("base_layer", "routed_experts")) + "."
    for vllm_part, hf_part in layout.renames if layout is not None else ():
        name = name.replace(vllm_part, hf_part)
    return name[:-1]


def expert_layout(model_type: str) -> ExpertLayout:
    """The layout of `model_type`'s experts, or a `RuntimeError` naming the architectures that have one."""
    if model_type not in EXPERT_LAYOUTS:
        raise RuntimeError(
            f"shared_hf_model: no mapping of vLLM's fused experts to transformers for model_type {model_type!r} "
            f"(mapped: {sorted(EXPERT_LAYOUTS)}). Share the weights of a mapped architecture, or keep a second "
            "copy (vllm_shared_weights=False in trl_longctx)."
        )
    return EXPERT_LAYOUTS[model_type]


def expert_views(module: torch.nn.Module, name: str, layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """The transformers parameters of one vLLM MoE layer as views of its tensors.

    Args:
        module: The vLLM module holding ``w13_weight`` / ``w2_weight`` (:func:`is_expert_module`).
        name: Its name in the vLLM model.
        layout: Its architecture's :data:`EXPERT_LAYOUTS` entry.

    Returns:
        transformers parameter name (``....mlp.experts.gate_up_proj`` ...) -> view of vLLM's tensor.

    Raises:
        RuntimeError: vLLM re-laid the experts out for a kernel other than :data:`VIEWABLE_BACKENDS`, or quantized
            them.
    """
    backend = getattr(getattr(getattr(module, "quant_method", None), "unquantized_backend", None), "value", None)
    dtype = module.w13_weight.dtype
    if backend is None or not dtype.is_floating_point or dtype.itemsize < 2:
        method = type(getattr(module, "quant_method", None)).__name__
        raise RuntimeError(
            f"{name}: vLLM holds these experts quantized or for another kernel ({method}, w13_weight {dtype}), in a "
            "layout the trainer cannot view. Share bf16 experts, or keep a second copy (vllm_shared_weights=False "
            "in trl_longctx)."
        )
    if backend not in VIEWABLE_BACKENDS:
        raise RuntimeError(
            f"{name}: vLLM's {backend} MoE kernels re-lay the experts out after loading (gate and up swapped, tiled "
            f"or prepacked), which the trainer cannot view; only {list(VIEWABLE_BACKENDS)} keep the checkpoint "
            "layout. Use vLLM's Triton MoE backend (its moe_backend='triton'), or keep a second copy "
            "(vllm_shared_weights=False in trl_longctx)."
        )
    prefix = hf_module_name(name, layout)

    def view(tensor: torch.Tensor) -> torch.Tensor:  # w13 / w2: [experts, out, in]
        tensor = tensor.detach()
        return tensor.transpose(1, 2) if layout.transposed else tensor

    views = {f"{prefix}.gate_up_proj": view(module.w13_weight), f"{prefix}.down_proj": view(module.w2_weight)}
    if layout.biases:
        views[f"{prefix}.gate_up_proj_bias"] = module.w13_bias.detach()
        views[f"{prefix}.down_proj_bias"] = module.w2_bias.detach()
    return views


def _checkpoint_files(model: str) -> list[Path]:
    """The safetensors files of the checkpoint `model` (a folder, or a Hub id in the local Hugging Face cache); empty
    when none can be found here."""
    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors.index.json", "model.safetensors"):
            cached = try_to_load_from_cache(model, name)
            if isinstance(cached, str):
                folder = Path(cached).parent
                break
        else:
            return []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def _read_tensors(files: list[Path], names: list[str], *, first_row: bool = False) -> dict[str, torch.Tensor]:
    """The tensors `names` present in `files`; with `first_row`, only their first row along dim 0 is read."""
    from safetensors import safe_open

    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in set(names) & set(handle.keys()):
                found[name] = handle.get_slice(name)[0:1][0] if first_row else handle.get_tensor(name)
    return found


def verify_first_expert(views: dict[str, torch.Tensor], prefix: str, model: str) -> str | None:
    """Compare expert 0 of the MoE layer `prefix` (e.g. ``model.layers.0.mlp.experts``), as viewed, with the
    checkpoint `model`'s tensors: fused (``{prefix}.gate_up_proj``, in transformers' layout) or one tensor per expert
    (``{prefix}.0.gate_proj.weight``, ``up_proj``, ``down_proj``, as transformers saves Qwen3-MoE).

    Returns:
        `None` when they are equal (after casting the checkpoint's values to the views' dtype, as vLLM loads them), or
        why nothing could be compared (no safetensors file of `model` here, or none of the names in it).

    Raises:
        RuntimeError: They differ: vLLM holds these experts in a layout the views do not read.
    """
    files = _checkpoint_files(model)
    if not files:
        return f"no safetensors checkpoint of {model!r} found here"
    gate_up, down = views[f"{prefix}.gate_up_proj"][0], views[f"{prefix}.down_proj"][0]
    fused = [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]
    split = [f"{prefix}.0.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")]
    rows = _read_tensors(files, fused, first_row=True)  # a fused tensor's first row is expert 0
    if len(rows) == len(fused):
        expected = (rows[fused[0]], rows[fused[1]])
    elif len(tensors := _read_tensors(files, split)) == len(split):
        expected = (torch.cat([tensors[split[0]], tensors[split[1]]]), tensors[split[2]])
    else:
        return f"the checkpoint has neither {fused} nor {split}"
    for name, view, value in zip(("gate_up_proj", "down_proj"), (gate_up, down), expected, strict=True):
        value = value.to(view.dtype)
        if value.shape != view.shape or not torch.equal(value, view.to(value.device)):
            raise RuntimeError(
                f"{prefix}.{name}: expert 0 as viewed in vLLM's tensors differs from the checkpoint's (vLLM holds the "
                "experts in another layout than its MoE backend says), so the trainer would train scrambled experts. "
                "Keep a second copy (vllm_shared_weights=False in trl_longctx)."
            )
    return None
