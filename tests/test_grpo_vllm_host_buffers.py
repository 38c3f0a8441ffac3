"""End to end with real vLLM (CPU build) colocated: the host buffers of the offloaded checkpoints are reserved after
each rollout, sized by its lengths, and serve the training steps without any allocation of their own."""

import pytest

pytest.importorskip("vllm")

from conftest import colocated_grpo_trainer  # noqa: E402

from trl_longctx.memory import offload_checkpoints  # noqa: E402

pytestmark = pytest.mark.slow


def test_buffers_reserved_after_the_rollout_serve_every_step(tmp_path, monkeypatch, caplog):
    # Buffers at their exact sizes (no 2 MiB rounding): a reservation sized wrong would leave the step allocating.
    monkeypatch.setattr(offload_checkpoints, "_BUFFER_GRANULARITY", 1)
    trainer = colocated_grpo_trainer(tmp_path, monkeypatch, vllm_gpu_memory_utilization=0.1, offload_checkpoints=True,
                                     gradient_checkpointing=True)  # fmt: skip
    with caplog.at_level("INFO", logger="trl_longctx.longctx_grpo_trainer"):
        trainer.train()
    offloader = trainer.logprob_pass.offloader
    assert offloader.offloaded_count > 0 and offloader.pool_allocations == 0
    layers = trainer.model.config.num_hidden_layers
    reserved = f"step 1: host buffers of offloaded checkpoints: {layers - 1} reserved in the background"
    assert any(m.startswith(reserved) for m in caplog.messages), caplog.messages
    assert not any("allocated" in m and "host buffers" in m for m in caplog.messages)
