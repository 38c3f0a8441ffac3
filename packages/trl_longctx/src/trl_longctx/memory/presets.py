"""Architecture numbers of common models, usable offline by the memory planner, or read from a `config.json`."""

from __future__ import annotations

import json
from pathlib import Path

from .planner import ModelShape

# From the models' published config.json files (Hugging Face Hub, mid-2026 revisions).
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
