"""End to end: LongContextGRPOTrainer with real vLLM (CPU build) colocated in-process, KV cache released in training."""

import pytest

pytest.importorskip("vllm")

from conftest import colocated_grpo_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from vllm_standby import kv_cache_nbytes  # noqa: E402

pytestmark = pytest.mark.slow


class KVCacheProbe(TrainerCallback):
    """Records the bytes held by vLLM's KV cache whenever the trainer is training (after each optimizer step)."""

    def __init__(self, llm):
        self.llm = llm
        self.kv_bytes_in_training = []

    def on_step_end(self, args, state, control, **kwargs):
        self.kv_bytes_in_training.append(kv_cache_nbytes(self.llm))


def test_kv_cache_is_released_while_training_and_rollouts_work(tmp_path, monkeypatch):
    trainer = colocated_grpo_trainer(tmp_path, monkeypatch, vllm_gpu_memory_utilization=0.1)
    llm = trainer.vllm_generation.llm
    assert trainer.rollout_plan.kv_standby == "trainer"
    assert kv_cache_nbytes(llm) == 0  # released right after the engine was built
    probe = KVCacheProbe(llm)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.kv_bytes_in_training == [0, 0, 0]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 3 and all(h["completions/mean_length"] > 0 for h in logs)
    # The rollouts came from weights in sync with the trainer's.
    assert all(h["sampling/sampling_logp_difference/mean"] < 0.05 for h in logs)
