"""Tiny models and tokenizers built locally, for the quickstart, tests and offline demos.

Nothing here downloads anything: the tokenizer is built in code with the `tokenizers` library and the model is a
transformers architecture instantiated from a config with random weights.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# One token per character: small enough for a 2-core CPU, rich enough for prompts such as "copy: k".
CHARACTERS = list(string.ascii_lowercase + string.digits + " :.,+-=?")


def build_char_tokenizer(special_tokens: list[str] | None = None, named_special_tokens: dict[str, str] | None = None):
    """Build a character-level tokenizer (one token per character) with pad/bos/eos/unk specials.

    Args:
        special_tokens: More special tokens, after the characters in the vocabulary (e.g. a chat template's).
        named_special_tokens: Of those, the ones the tokenizer exposes as attributes (`{"image_token": "<img>"}`
            gives `tokenizer.image_token`).

    Returns:
        A `transformers.PreTrainedTokenizerFast` with left padding, as TRL's GRPO trainer expects.

    Example:
        >>> tok = build_char_tokenizer()
        >>> tok.decode(tok("copy: k")["input_ids"])
        'copy: k'
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = list(special_tokens or [])
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS + extra)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **({"extra_special_tokens": dict(named_special_tokens)} if named_special_tokens else {}),
    )
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast


def build_tiny_qwen3(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 64,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer=None,
):
    """Build a Qwen3-architecture causal LM with random weights.

    The head dim defaults to 64 because vLLM's CPU attention accepts 32, 64, 128 and similar, not 16.

    Args:
        vocab_size: Number of embedding rows (use the tokenizer's length).
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
            max_position_embeddings: The Qwen3 config fields of the same names.
        seed: Seed of the random initialization, for reproducible models.
        tokenizer: If given, its pad/bos/eos ids are written into the config.

    Returns:
        A `transformers.Qwen3ForCausalLM` in float32, on CPU.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=None if tokenizer is None else tokenizer.pad_token_id,
        bos_token_id=None if tokenizer is None else tokenizer.bos_token_id,
        eos_token_id=None if tokenizer is None else tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model


def save_tiny_model(output_dir: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Build the character tokenizer and a tiny Qwen3 with random weights, and save both to `output_dir`.

    Args:
        output_dir: Folder to write (`config.json`, weights, tokenizer files); created if missing.
        seed: Seed of the random weights.
        **config_overrides: Passed to `build_tiny_qwen3` (e.g. `num_hidden_layers=4`).

    Returns:
        The folder, usable as `model_name_or_path` by transformers, TRL and vLLM.
    """
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen3(len(tokenizer), seed=seed, tokenizer=tokenizer, **config_overrides)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    # Written file by file, not with `model.save_pretrained`: that writes on rank 0 only once torch.distributed is
    # initialized, and each process of a multi-process run builds its own copy in a folder of its own.
    model.config.architectures = [type(model).__name__]  # as save_pretrained records them, with the dtype
    model.config.dtype = next(model.parameters()).dtype
    model.config.save_pretrained(output_dir)
    model.generation_config.save_pretrained(output_dir)
    save_file(model.state_dict(), str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(output_dir)
    return output_dir
