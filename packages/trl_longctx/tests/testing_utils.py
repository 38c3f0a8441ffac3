"""Helpers shared by the trl_longctx tests (on sys.path through the tests folder's conftest)."""

import contextlib
import inspect

import torch
import transformers
from peft import LoraConfig, get_peft_model

# Sizes of `build_model`'s decoders.
HIDDEN, INTERMEDIATE, VOCAB = 32, 48, 64


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float) -> None:
    """`|actual - expected| <= atol + rtol * |expected|` everywhere; on failure, say where and by how much."""
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    worst = torch.argmax(error - allowed).item()
    assert (error <= allowed).all(), (
        f"{what}: max abs error {error.max().item():.3g} at flat index {worst}, allowed {allowed.flatten()[worst]:.3g}"
    )


def build_model(arch: str, lora: bool = False, use_reentrant: bool = False, layers: int = 2):
    """A tiny random decoder of `arch` (llama, qwen2, qwen3, mistral, gemma2, gemma3) with gradient checkpointing on,
    optionally PEFT LoRA (non-zero B) on the MLP and q/v projections; in train mode."""
    common = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        "gemma2": lambda: transformers.Gemma2Config(**common, sliding_window=4, query_pre_attn_scalar=16),
        "gemma3": lambda: transformers.Gemma3TextConfig(**common, sliding_window=4, query_pre_attn_scalar=16),
    }[arch]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if lora:
        # Nonzero B so that the adapters change the outputs and every LoRA matrix gets a gradient.
        targets = ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    return model.train()


@contextlib.contextmanager
def flex_backward_on_cpu():
    """Let torch's flex attention run its backward on CPU, for the tests only.

    torch 2.13 refuses `flex_attention` on CPU inputs that require grad with one check (`_validate_device`); behind
    it the uncompiled path runs flex attention's reference implementation (dense scores, the same higher-order op
    the compiled kernels lower), whose backward computes on CPU too. Lifting that check lets the tests compare
    `trl_longctx.attention` and its gradients with eager attention. Fails loudly when torch no longer has the check.
    """
    from torch.nn.attention import flex_attention as module

    check = module._validate_device
    assert list(inspect.signature(check).parameters) == ["query", "key", "value"], "torch's flex check moved"

    def allow_cpu_backward(query, key, value):
        if query.device.type != "cpu":
            check(query, key, value)

    module._validate_device = allow_cpu_backward
    try:
        yield
    finally:
        module._validate_device = check
