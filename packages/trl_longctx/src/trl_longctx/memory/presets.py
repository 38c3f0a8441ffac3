"""Architecture numbers of common models, usable offline by the memory planner, or read from a `config.json`."""

from __future__ import annotations

import json
from pathlib import Path

from .shapes import ModelShape, VisionShape

# The published values of the models' config.json files on the Hugging Face Hub (mid-2026 revisions).
PRESETS: dict[str, ModelShape] = {
    "qwen3-1.7b": ModelShape(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True, qk_norm=True,
    ),
    "qwen3-8b": ModelShape(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False, qk_norm=True,
    ),
    "qwen3-32b": ModelShape(
        hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False, qk_norm=True,
    ),
    "llama3.1-8b": ModelShape(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, qk_norm=False,
    ),
    # Qwen/Qwen3-30B-A3B: 128 experts of 768 in all 48 layers (decoder_sparse_step 1, no mlp_only_layers), top 8;
    # `intermediate_size` 6144 is the dense MLP size, which no layer uses. 30.5B parameters, 3.3B active.
    "qwen3-30b-a3b": ModelShape(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False, qk_norm=True,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    ),
    # openai/gpt-oss-20b: 32 experts of 2880 (`intermediate_size`) in all 24 layers, top 4, biases on experts and
    # router, clamped-GLU experts. 21B parameters, 3.6B active. The checkpoint stores the experts in MXFP4 (4.25 bits
    # per parameter), but transformers does not train MXFP4 weights (its quantizer refuses training and asks for
    # `Mxfp4Config(dequantize=True)`), so the trainer holds them in bf16, as counted here. Its attention (sinks)
    # runs eager or with a flash-attention kernel from the hub; the planner's SDPA-like attention terms assume the
    # latter (eager holds `[heads, T, T]` scores).
    "gpt-oss-20b": ModelShape(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, vocab_size=201088, tie_word_embeddings=False, qk_norm=False,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=2880, expert_bias=True,
        expert_activation_tensors=4,
    ),
    # Qwen/Qwen3-VL-8B-Instruct: Qwen3-8B's text decoder; a 27-block vision tower of 1152 (patch 16, 2x2 merge,
    # deepstack mergers after blocks 8, 16 and 24), 0.58B parameters.
    "qwen3-vl-8b": ModelShape(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False, qk_norm=True,
        vision=VisionShape.from_config({
            "hidden_size": 1152, "intermediate_size": 4304, "depth": 27, "out_hidden_size": 4096, "patch_size": 16,
            "temporal_patch_size": 2, "in_channels": 3, "spatial_merge_size": 2, "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        }),
    ),
}  # fmt: skip


def load_model_shape(model: str) -> ModelShape:
    """The `ModelShape` of a preset name, or of a `config.json` (or a folder holding one).

    Raises:
        ValueError: If `model` is neither a preset nor a readable config with the needed keys; the message lists
            the presets.
    """
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"--model must be one of the presets {sorted(PRESETS)} or a path to a config.json, got {model!r}."
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--model: cannot read {path}: {error}") from error
    try:
        return ModelShape.from_config(config)
    except ValueError as error:
        raise ValueError(f"--model: {path}: {error}") from None
