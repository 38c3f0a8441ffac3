"""`tools/bench/recipe_run.py`'s redraw of vLLM's dummy weights (`redraw_like_transformers`), on the CPU: norms 1,
biases 0, matrices N(0, 0.02), quantized layers left; a model redrawn so has a next-token distribution far from
flat, where vLLM's dummy weights (U(-1e-3, 1e-3), norms included) give a flat one.

Tolerances: the redrawn matrices' standard deviation within 5% of 0.02 and mean within 1e-3 (over 6.5e4 or more
draws each); "flat" is an entropy within 1e-3 of ln V, "far from flat" at least 0.1 below it.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

_SPEC = importlib.util.spec_from_file_location(
    "bench_recipe_run", Path(__file__).resolve().parents[1] / "tools" / "bench" / "recipe_run.py"
)
recipe_run = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = recipe_run
_SPEC.loader.exec_module(recipe_run)


def _tiny_qwen3():
    # Hidden size 1,024: logits of std about 0.02 x sqrt(1024) = 0.64 after the final norm, an entropy about 0.2 below
    # ln V (Qwen3-8B's 4,096: 1.28, about 0.8 below).
    config = Qwen3Config(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=64)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def _entropy(model) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def test_redraw_gives_norms_biases_and_matrices_as_transformers_does():
    model = _tiny_qwen3()
    with torch.no_grad():  # vLLM's dummy loader: everything from U(-1e-3, 1e-3)
        for param in model.parameters():
            param.uniform_(-1e-3, 1e-3)
    flat = _entropy(model)
    assert abs(flat - math.log(model.config.vocab_size)) < 1e-3
    extra = {"ln_q": torch.nn.LayerNorm(256), "proj": torch.nn.Linear(256, 256)}  # a LayerNorm's bias, a Linear's
    model.add_module("extra", torch.nn.ModuleDict(extra))
    fp8 = torch.nn.Module()  # an FP8 layer: its weight and its float32 scales stay as loaded
    fp8.weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float8_e4m3fn), requires_grad=False)
    fp8.weight_scale = torch.nn.Parameter(torch.full((4, 1), 0.5), requires_grad=False)
    model.extra.add_module("fp8", fp8)
    redrawn = recipe_run.redraw_like_transformers(model)
    params = dict(model.named_parameters())
    assert redrawn == len(params) - 2  # all but the FP8 layer's
    assert torch.equal(fp8.weight.float(), torch.ones(4, 4)) and torch.equal(fp8.weight_scale, torch.full((4, 1), 0.5))
    for name, param in params.items():
        if name.startswith("extra.fp8."):
            continue
        if param.dim() >= 2:
            assert abs(param.std().item() / 0.02 - 1) < 0.05 and abs(param.mean().item()) < 1e-3, name
        elif "norm" in name or name == "extra.ln_q.weight":
            assert name.endswith("weight") and torch.equal(param, torch.ones_like(param)), name
        else:
            assert torch.equal(param, torch.zeros_like(param)), name
    assert _entropy(model) < math.log(model.config.vocab_size) - 0.1


def test_redraw_reaches_the_model_of_vllms_cpu_engine(tmp_path, monkeypatch):
    """As `recipe_run.py` calls it on a dummy-loaded engine: through `LLM.collective_rpc`, in place on the weights vLLM
    samples from (the CPU build prepacks its linear layers; their float parameters are redrawn all the same)."""
    vllm = pytest.importorskip("vllm", reason="vLLM's CPU build (the integration cell)")
    from trl_longctx.tiny_models import save_tiny_model

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = vllm.LLM(model=str(save_tiny_model(tmp_path / "model")), load_format="dummy", max_model_len=64,
                   enforce_eager=True, dtype="float32", seed=0)  # fmt: skip
    (redrawn,) = llm.collective_rpc(recipe_run._redraw_worker_model)
    (model,) = llm.collective_rpc(lambda worker: worker.model_runner.get_model())
    norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
    assert redrawn > len(norms) > 0
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms.values()), list(norms)
    embedding = model.model.embed_tokens.weight
    assert abs(embedding.std().item() / 0.02 - 1) < 0.05
