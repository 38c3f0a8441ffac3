"""End to end: LoRA GRPO on FP8 base weights that ARE vLLM's (`vllm_fp8_weights`), on vLLM's CPU build.

The rollout plan refuses FP8 on the CPU (FP8 is for Hopper-class GPUs), and the first test checks that it does so
before anything loads. vLLM's CPU build does quantize a checkpoint per channel with the same layout as CUDA (torch's
`_scaled_mm` kernel, on CPUs without AMX), so the second test stands in a Hopper runtime for the plan only, to drive
the trainer's whole FP8 path here: vLLM quantizes, the trainer's base layers are `Fp8Linear` views of its FP8 weights
and scales (dequantized per matmul, as the plan picks for every scale layout, while vLLM multiplies with its FP8
kernel), the adapter reaches vLLM in memory, and TRL's importance sampling reports the sampler/trainer gap.
"""

import dataclasses

import pytest
import torch
from conftest import colocated_grpo_trainer, storage_ptrs

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

# Mean |log p_trainer - log p_vLLM| of the sampled tokens (TRL's sampling/sampling_logp_difference/mean) on the tiny
# bf16 model on the same FP8 weights: the sampler rounds each layer's input to e4m3 per token (up to 2**-4 relative),
# the trainer multiplies the bf16 input by the dequantized weight, so the bound is looser than an exact match (seen:
# 0.007-0.011 per token), and far below what misplaced weights or scales give (whole units).
FP8_MEAN_LOGP_GAP = 0.05


def test_fp8_on_the_cpu_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from peft import LoraConfig

    with pytest.raises(ValueError, match=r"vllm_fp8_weights='per-channel': vLLM .* \(cpu\) runs on the CPU.*Allowed "
                       r"here: bf16 shared weights \(vllm_fp8_weights=None\) on the CPU\."):  # fmt: skip
        colocated_grpo_trainer(
            tmp_path, monkeypatch, peft_config=LoraConfig(r=4, target_modules="all-linear"),
            vllm_fp8_weights="per-channel", model_init_kwargs={"dtype": "bfloat16"},
        )  # fmt: skip
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_lora_grpo_on_shared_fp8_weights(tmp_path, monkeypatch):
    from peft import LoraConfig

    from trl_longctx import rollout_plan
    from vllm_standby import Fp8Linear, _worker

    detected = rollout_plan.VLLMRuntime.detect()
    if "per-channel" not in detected.fp8:
        pytest.skip(f"{detected.describe()} has no online FP8 per-channel quantization")
    hopper = dataclasses.replace(detected, platform="cuda", capability=(9, 0))
    monkeypatch.setattr(rollout_plan.VLLMRuntime, "detect", classmethod(lambda cls: hopper))
    trainer = colocated_grpo_trainer(
        tmp_path, monkeypatch, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        vllm_fp8_weights="per-channel", model_init_kwargs={"dtype": "bfloat16"}, learning_rate=5e-2,
    )  # fmt: skip
    plan = trainer.rollout_plan
    assert (plan.fp8, plan.fp8_matmul, plan.adapter_transport) == ("per-channel", "dequantize", "lora-request")
    llm = trainer.vllm_generation.llm
    vllm_params = list(llm.collective_rpc(_worker.model_of)[0].parameters())
    layers = [m for m in trainer.model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 7 * trainer.model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    assert all(layer.matmul == "dequantize" for layer in layers)
    fp8_tensors = [t for layer in layers for t in (layer.weight, layer.weight_scale)]
    # One copy: every FP8 weight and scale the trainer holds lives in a storage of vLLM's.
    assert storage_ptrs(fp8_tensors) <= storage_ptrs(vllm_params)
    before = [t.detach().clone() for t in fp8_tensors]

    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 3
    gaps = [h["sampling/sampling_logp_difference/mean"] for h in logs]
    assert all(0 < gap < FP8_MEAN_LOGP_GAP for gap in gaps), gaps
    assert all(torch.equal(t, b) for t, b in zip(fp8_tensors, before, strict=True))  # the FP8 base never moved
    assert storage_ptrs(fp8_tensors) <= storage_ptrs(vllm_params)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapter trained
    assert llm.adapter is not None and llm.adapter.lora_int_id >= 3  # and reached vLLM at each update
