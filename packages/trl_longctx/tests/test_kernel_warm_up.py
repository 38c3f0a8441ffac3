"""The trainer's Triton warm-up (`trl_longctx.kernel_warm_up`): where it starts, why it does not elsewhere (each
reason naming what keeps it off), and the log line of the first pass. The warm-up itself (no compile left for a run's
calls) is tested on CUDA in the kernels package (`tests/test_warmup.py`)."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_longctx.kernel_warm_up import KernelWarmUp, start_kernel_warm_up, warm_up_refusal
from trl_longctx.tiny_models import build_tiny_qwen3


@pytest.fixture
def model():
    return build_tiny_qwen3(64, hidden_size=32, num_attention_heads=1, head_dim=32, intermediate_size=64)


def test_switched_off_it_neither_starts_nor_logs(model, caplog):
    with caplog.at_level(logging.INFO, logger="trl_longctx.kernel_warm_up"):
        assert start_kernel_warm_up(False, "triton", model) is None
    assert warm_up_refusal(False, "triton", model) == "warm_up_kernels=False"
    assert caplog.records == []


def test_the_torch_backend_is_told_it_compiles_nothing(model, caplog):
    with caplog.at_level(logging.INFO, logger="trl_longctx.kernel_warm_up"):
        assert start_kernel_warm_up(True, "torch", model) is None
    assert "the log-prob pass runs the torch backend, which compiles nothing" in caplog.text


def test_an_adapter_on_the_lm_head_keeps_it_off(model):
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert "the lm_head carries an adapter" in warm_up_refusal(True, "triton", peft_model)


def test_a_weight_that_is_not_a_whole_cuda_tensor_keeps_it_off(model):
    why = warm_up_refusal(True, "triton", model)
    assert "not a whole CUDA tensor here (Parameter of shape (64, 32) on cpu" in why
    model.lm_head.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside its gathers
    assert "shape (0,)" in warm_up_refusal(True, "triton", model)


def test_the_first_wait_logs_the_warm_up_and_later_ones_do_nothing(caplog):
    from longctx_kernels.warmup import BackgroundWarmUp

    warm_up = KernelWarmUp(BackgroundWarmUp(started=0.0, seconds=6.25, calls=8))
    with caplog.at_level(logging.WARNING, logger="trl_longctx.kernel_warm_up"):
        warm_up.wait()
        warm_up.wait()
    assert [r.getMessage() for r in caplog.records] == [
        "Triton kernels of the fused log-probs: 8 warm-up calls compiled them in the background in 6.2 s; the first "
        "log-prob pass waited 0.0 s for them (warm_up_kernels=False leaves them to the first step)."
    ]
