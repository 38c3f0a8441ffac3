"""What the memory model counts a model by: its architecture numbers (`ModelShape`, with a vision tower's
`VisionShape` and the MoE fields), read from a config, and the units the terms are counted in.

Plain Python (no torch): `longctx-grpo plan` reads these without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

GIB = 2**30
BF16 = 2
FP32 = 4
# Bytes per weight of a linear layer in bitsandbytes' 4 bits (NF4/FP4, blocks of 64 weights): 4 bits and a float32
# scale per block; with double quantization (`bnb_4bit_use_double_quant`) the scales are 8-bit, with a float32 scale
# per 256 of them (~0.127 bits per weight in all).
NF4_BYTES_PER_PARAM = 0.5 + FP32 / 64
NF4_NESTED_BYTES_PER_PARAM = 0.5 + 0.127 / 8


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def text_config(config: Any) -> Any:
    """The text decoder's config of a transformers config (a vision-language model's `text_config`), or `config` itself
    where it has no `get_text_config` (a plain namespace)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class VisionShape:
    """Architecture numbers of a vision-language model's vision tower (its `vision_config`).

    Attributes:
        hidden_size: Width of the tower's blocks (`Hv`).
        depth: Blocks.
        mergers: Patch mergers (1, plus Qwen3-VL's one per `deepstack_visual_indexes` entry).
        patch_dim: Pixel values per patch (`in_channels * temporal_patch_size * patch_size**2`).
        params: Parameters of the tower (`vision_params`): held in bf16 beside the decoder's weights.
        linears: `(in, out)` of every `nn.Linear` of the tower (`vision_linears`), what LoRA on "all-linear"
            adapts when the tower is trained.
    """

    hidden_size: int
    depth: int
    mergers: int = 1
    patch_dim: int = 0
    params: int = 0
    linears: tuple[tuple[int, int], ...] = ()

    def lora_params(self, rank: int) -> int:
        """LoRA parameters of an adapter (`r * (in + out)`) on every linear layer of the tower."""
        return sum(rank * (a + b) for a, b in self.linears)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VisionShape:
        """The shape of a `vision_config` dict (Qwen2.5-VL, Qwen3-VL field names).

        Raises:
            ValueError: If `hidden_size` or `depth` is missing.
        """
        missing = [k for k in ("hidden_size", "depth") if config.get(k) is None]
        if missing:
            raise ValueError(f"vision_config lacks {missing}; is it a Qwen-VL vision config?")
        patch, temporal = config.get("patch_size") or 0, config.get("temporal_patch_size") or 1
        patch_dim = (config.get("in_channels") or 3) * temporal * patch * patch
        return cls(
            hidden_size=config["hidden_size"],
            depth=config["depth"],
            mergers=1 + len(config.get("deepstack_visual_indexes") or ()),
            patch_dim=patch_dim,
            params=vision_params(config, patch_dim),
            linears=vision_linears(config),
        )


def vision_linears(config: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """`(in, out)` of every `nn.Linear` of a Qwen2.5-VL or Qwen3-VL vision tower (the patch embedding is a
    convolution): per block qkv, the output projection and the MLP (Qwen2.5-VL gate, up, down; Qwen3-VL fc1, fc2),
    then each patch merger's two layers (`vision_params` for the layout); empty when sizes are missing."""
    h, i, out = config["hidden_size"], config.get("intermediate_size"), config.get("out_hidden_size")
    if not i or not out:
        return ()
    q = h * (config.get("spatial_merge_size") or 2) ** 2
    merger = ((q, q), (q, out))
    if "deepstack_visual_indexes" in config:  # Qwen3-VL
        block = ((h, 3 * h), (h, h), (h, i), (i, h))
        mergers = 1 + len(config["deepstack_visual_indexes"])
    else:
        block = ((h, 3 * h), (h, h), (h, i), (h, i), (i, h))
        mergers = 1
    return block * config["depth"] + merger * mergers


def vision_params(config: Mapping[str, Any], patch_dim: int) -> int:
    """Parameters of a Qwen2.5-VL or Qwen3-VL vision tower from its `vision_config` (Qwen3-VL's has
    `deepstack_visual_indexes`); 0 when `intermediate_size` or `out_hidden_size` is missing.

    Per block: two norms (RMSNorm; Qwen3-VL LayerNorm with bias), qkv and output projections with biases, and the MLP
    (Qwen2.5-VL gated, 3 matrices; Qwen3-VL two) with biases. The patch embedding (a bias-free convolution; Qwen3-VL
    with a bias, plus learned position embeddings), and each patch merger: a norm, then `q -> q -> out` with biases
    for `q = hidden * spatial_merge_size**2` (Qwen3-VL's deepstack mergers normalize over `q`).
    """
    h, i, out = config["hidden_size"], config.get("intermediate_size"), config.get("out_hidden_size")
    if not i or not out:
        return 0
    q = h * (config.get("spatial_merge_size") or 2) ** 2
    projections = (3 * h * h + 3 * h) + (h * h + h)
    merger = q * q + q + q * out + out
    if "deepstack_visual_indexes" in config:  # Qwen3-VL
        block = 4 * h + projections + 2 * h * i + i + h
        embedding = patch_dim * h + h + (config.get("num_position_embeddings") or 0) * h
        deepstack = len(config["deepstack_visual_indexes"]) * (2 * q + merger)
        return embedding + config["depth"] * block + (2 * h + merger) + deepstack
    block = 2 * h + projections + 3 * h * i + 2 * i + h  # Qwen2.5-VL
    return patch_dim * h + config["depth"] * block + (h + merger)


def vision_saved_bytes_per_patch(vision: VisionShape) -> int:
    """What a vision tower that takes gradients keeps per patch until its backward (module docstring: block inputs,
    patch mergers, patch embedding input)."""
    h = vision.hidden_size
    return BF16 * h * vision.depth + (FP32 * h + 3 * BF16 * h) * vision.mergers + BF16 * vision.patch_dim


class VisionLoad(NamedTuple):
    """What the images of a log-prob pass feed the vision tower: `patches` per sequence (the most of any sequence)
    and whether the tower takes gradients (`trained`). `VisionLoad()`: no images."""

    patches: int = 0
    trained: bool = False


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers of a decoder-only LM (the `config.json` fields of the same names).

    Mixture-of-Experts models (`num_experts > 0`) replace the MLP of `num_hidden_layers - dense_mlp_layers` layers
    by a router (`[experts, H]`) and `num_experts` expert MLPs of `moe_intermediate_size`, each token going to
    `num_experts_per_tok` of them; `intermediate_size` is then the dense MLP of the other layers (Qwen3-MoE's
    `mlp_only_layers`), unused when there are none. Transformers 5.17 stores the experts as 3-D parameters and the
    router as a plain parameter, not `nn.Linear`: bitsandbytes (QLoRA) leaves both in bf16, and PEFT reaches the
    experts only through `target_parameters`.

    `vision`: the vision tower of a vision-language model (`None` for a text-only model).

    Attributes (beyond the config's names):
        dense_mlp_layers: Layers of an MoE model with a dense MLP instead of experts.
        expert_bias: Biases on the expert projections and the router (gpt-oss).
        expert_activation_tensors: `[N * k, moe_intermediate_size]` tensors the experts' activation keeps for its
            backward: 1 for SiLU-gated experts (Qwen3-MoE, Mixtral: `silu(gate)`), 4 for gpt-oss's clamped GLU (the
            clamped gate, its sigmoid, `up + 1` and the GLU).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    vision: VisionShape | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    dense_mlp_layers: int = 0
    expert_bias: bool = False
    expert_activation_tensors: int = 1

    def __post_init__(self):
        if self.num_experts:
            for name in ("num_experts_per_tok", "moe_intermediate_size"):
                _check_int(name, getattr(self, name), 1)
            if not 0 <= self.dense_mlp_layers <= self.num_hidden_layers:
                raise ValueError(
                    f"dense_mlp_layers must be in [0, num_hidden_layers={self.num_hidden_layers}], got "
                    f"{self.dense_mlp_layers!r}."
                )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def moe_layers(self) -> int:
        """Layers with experts (0 for a dense model)."""
        return self.num_hidden_layers - self.dense_mlp_layers if self.num_experts else 0

    @property
    def dense_layers(self) -> int:
        """Layers with a dense gate/up/down MLP (all of a dense model's)."""
        return self.num_hidden_layers - self.moe_layers

    def attention_shapes(self) -> list[tuple[int, int]]:
        """`(in, out)` of the attention's linear layers of one decoder layer (q, k, v, o)."""
        h = self.hidden_size
        return [(h, self.q_size), (h, self.kv_size), (h, self.kv_size), (self.q_size, h)]

    def mlp_shapes(self) -> list[tuple[int, int]]:
        """`(in, out)` of a dense MLP's linear layers (gate, up, down)."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, i), (h, i), (i, h)]

    def linear_shapes(self) -> list[tuple[int, int]]:
        """`(in, out)` of the linear layers of one decoder layer with a dense MLP (q, k, v, o, gate, up, down)."""
        return self.attention_shapes() + self.mlp_shapes()

    def linear_params(self) -> int:
        """Parameters of `nn.Linear` layers in the decoder: attentions and dense MLPs (what QLoRA quantizes)."""
        attention, mlp = (sum(a * b for a, b in shapes) for shapes in (self.attention_shapes(), self.mlp_shapes()))
        return self.num_hidden_layers * attention + self.dense_layers * mlp

    def expert_params_per_layer(self) -> int:
        """Parameters of one MoE layer's experts: gate/up `[E, 2 I_e, H]` and down `[E, H, I_e]` (+ their biases)."""
        e, h, i = self.num_experts, self.hidden_size, self.moe_intermediate_size
        return e * 3 * h * i + (e * (2 * i + h) if self.expert_bias else 0)

    def moe_params(self) -> int:
        """Experts and routers (`[E, H]`, + bias) of every MoE layer: 3-D and plain parameters that stay bf16 under
        QLoRA."""
        router = self.num_experts * self.hidden_size + (self.num_experts if self.expert_bias else 0)
        return self.moe_layers * (self.expert_params_per_layer() + router)

    def other_params(self) -> int:
        """Embeddings, lm_head, norms and a vision tower: counted in bf16 even with QLoRA."""
        heads = 1 if self.tie_word_embeddings else 2
        norms = self.num_hidden_layers * 2 * self.hidden_size + self.hidden_size
        if self.qk_norm:
            norms += self.num_hidden_layers * 2 * self.head_dim
        vision = 0 if self.vision is None else self.vision.params
        return heads * self.vocab_size * self.hidden_size + norms + vision

    def total_params(self) -> int:
        return self.linear_params() + self.moe_params() + self.other_params()

    def lora_params_per_layer(self, rank: int) -> int:
        """LoRA parameters of a layer with a dense MLP, an adapter on each of its linear layers."""
        return sum(rank * (a + b) for a, b in self.linear_shapes())

    def lora_params(self, rank: int, experts: bool = False) -> int:
        """LoRA parameters of the decoder: an adapter (`r * (in + out)`) on every `nn.Linear` (PEFT's "all-linear":
        attentions, dense MLPs; not the routers), and with `experts` on both expert weights of every MoE layer
        through PEFT `target_parameters` (`ParamWrapper`: `r * E` rows, `r * E * (in + out)` per weight)."""
        attention = sum(rank * (a + b) for a, b in self.attention_shapes())
        mlp = sum(rank * (a + b) for a, b in self.mlp_shapes())
        total = self.num_hidden_layers * attention + self.dense_layers * mlp
        if experts:
            h, i = self.hidden_size, self.moe_intermediate_size
            total += self.moe_layers * rank * self.num_experts * ((h + 2 * i) + (i + h))
        return total

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ModelShape:
        """The shape of a transformers config object or `config.json` dict (multimodal: its text config, and its
        `vision_config` as `vision`).

        MoE configs: Qwen3-MoE style (`num_experts`, `moe_intermediate_size`, `mlp_only_layers`,
        `decoder_sparse_step`) and gpt-oss / Mixtral style (`num_local_experts`, the experts' `intermediate_size`),
        with `num_experts_per_tok`.

        Raises:
            ValueError: If a needed key is missing.
        """
        vision = None
        if not isinstance(config, Mapping):
            vision = getattr(config, "vision_config", None)
            text = text_config(config)
            config = text.to_dict() if hasattr(text, "to_dict") else vars(text)
        else:
            vision = config.get("vision_config")
        if vision is not None and not isinstance(vision, Mapping):
            vision = vision.to_dict()
        config = config.get("text_config") or config
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if config.get(k) is None]
        if missing:
            raise ValueError(f"config lacks {missing}; is it a decoder-only causal LM config?")
        heads = config["num_attention_heads"]
        model_type = str(config.get("model_type", ""))
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=model_type.startswith("qwen3"),
            vision=None if vision is None else VisionShape.from_config(vision),
            **_moe_fields(config, model_type),
        )


def _moe_fields(config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """`ModelShape`'s MoE fields of a config dict (none for a dense model)."""
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    if not experts:
        return {}
    top_k = config.get("num_experts_per_tok")
    if top_k is None:
        raise ValueError(f"MoE config ({experts} experts) lacks ['num_experts_per_tok'].")
    layers, step = config["num_hidden_layers"], config.get("decoder_sparse_step") or 1
    only_mlp = set(config.get("mlp_only_layers") or ())
    dense = sum(1 for i in range(layers) if i in only_mlp or (i + 1) % step != 0)  # Qwen3-MoE's rule
    gpt_oss = model_type == "gpt_oss"
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": config.get("moe_intermediate_size") or config["intermediate_size"],
        "dense_mlp_layers": dense,
        "expert_bias": gpt_oss,
        "expert_activation_tensors": 4 if gpt_oss else 1,
    }
