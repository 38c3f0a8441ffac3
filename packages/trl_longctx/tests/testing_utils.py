"""Helpers shared by the trl_longctx tests (on sys.path through the tests folder's conftest)."""

import contextlib
import inspect
import os
import socket
import subprocess
import sys

import torch
import transformers
from peft import LoraConfig, get_peft_model

# Sizes of `build_model`'s decoders.
HIDDEN, INTERMEDIATE, VOCAB = 32, 48, 64


def _tiny_config_values(layers: int, vocab: int) -> dict:
    """The config values every tiny test decoder shares (dense and MoE builders add their MLP sizes)."""
    return {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }


def cpu_trainer_settings(tmp_path, **overrides) -> dict:
    """`LongContextGRPOConfig` keywords of a one-step trainer test on CPU in fp32, `overrides` on top."""
    return {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 1,
        "learning_rate": 1e-2,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "bf16": False,  # TRL 1.16 defaults to bf16, which autocasts on CPU too; the comparisons are in fp32
        **overrides,
    }


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
    common = {**_tiny_config_values(layers, VOCAB), "intermediate_size": INTERMEDIATE}
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


# Sizes of `build_moe_model`'s experts: distinct from HIDDEN, INTERMEDIATE and VOCAB so that a tensor's last dimension
# tells what it is (the gate/up output of the experts is `[rows, 2 * EXPERT_INTERMEDIATE]`).
EXPERT_INTERMEDIATE, NUM_EXPERTS, TOP_K = 20, 4, 2
MOE_ARCHS = ["qwen3_moe", "gpt_oss", "mixtral"]
# PEFT 0.21 `target_parameters`: LoRA on the fused expert weights (`ParamWrapper`, nested for the two of a module).
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(arch: str, layers: int = 2, vocab: int = VOCAB, **extra):
    """A tiny `arch` MoE config (qwen3_moe, gpt_oss, mixtral): NUM_EXPERTS experts of EXPERT_INTERMEDIATE, top
    TOP_K, eager attention. Qwen3-MoE with 3 or more layers makes layer 1 a dense MLP (`mlp_only_layers`)."""
    common = {
        **_tiny_config_values(layers, vocab),
        "num_experts_per_tok": TOP_K,
        **extra,
    }
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, intermediate_size=INTERMEDIATE, moe_intermediate_size=EXPERT_INTERMEDIATE,
            num_experts=NUM_EXPERTS, mlp_only_layers=[1] if layers >= 3 else [],
        )  # fmt: skip
    elif arch == "gpt_oss":  # attention sinks, sliding-window and full layers; its experts' intermediate size
        config = transformers.GptOssConfig(
            **common, intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=NUM_EXPERTS, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )  # fmt: skip
    else:
        config = transformers.MixtralConfig(
            **common, intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=NUM_EXPERTS, sliding_window=None
        )
    config._attn_implementation = "eager"
    return config


def build_moe_model(arch: str, lora: str = "none", layers: int = 2, use_reentrant: bool = False):
    """A tiny random MoE causal LM (`moe_config`) with gradient checkpointing on, in train mode; `lora`: "none" (full
    fine-tuning), "attention" (LoRA on q/v) or "experts" (q/v and the fused expert weights), non-zero B."""
    model = transformers.AutoModelForCausalLM.from_config(moe_config(arch, layers))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if lora != "none":
        parameters = EXPERT_PARAMETERS if lora == "experts" else None
        config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], target_parameters=parameters, init_lora_weights=False
        )
        model = get_peft_model(model, config)
    return model.train()


def run_torchrun(script: str, out, args: list[str], *, processes: int = 2, env: dict | None = None,
                 timeout: float = 240):  # fmt: skip
    """Run `script out args...` in `processes` CPU processes with torchrun (the launcher `accelerate launch` uses on
    GPUs), on a free port, `OMP_NUM_THREADS=1`; assert they all succeeded and return what rank 0 saved to `out`."""
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--nnodes", "1"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, str(out), *args]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(out)


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recording(function, calls: list):
    """`function` wrapped to append each call's result to `calls`."""

    def recorded(*args, **kwargs):
        calls.append(function(*args, **kwargs))
        return calls[-1]

    return recorded
