"""End to end: LongContextGRPOTrainer with real vLLM (CPU build) colocated in-process, KV cache released in training."""

import pytest

pytest.importorskip("vllm")

from transformers import TrainerCallback  # noqa: E402

pytestmark = pytest.mark.slow


class KVCacheProbe(TrainerCallback):
    """Records the bytes held by vLLM's KV cache whenever the trainer is training (after each optimizer step)."""

    def __init__(self, llm):
        self.llm = llm
        self.kv_bytes_in_training = []

    def on_step_end(self, args, state, control, **kwargs):
        from vllm_standby import kv_cache_nbytes

        self.kv_bytes_in_training.append(kv_cache_nbytes(self.llm))


def test_kv_cache_is_released_while_training_and_rollouts_work(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset
    from trl_longctx.tiny_models import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    args = LongContextGRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=64,
        vllm_gpu_memory_utilization=0.1,
        disable_tqdm=True,
    )
    trainer = LongContextGRPOTrainer(
        model=str(model_dir),
        reward_funcs=copy_letter_reward,
        args=args,
        train_dataset=make_copy_letter_dataset(64),
    )
    from vllm_standby import kv_cache_nbytes

    llm = trainer.vllm_generation.llm
    assert trainer._kv_standby
    assert kv_cache_nbytes(llm) == 0  # released right after the engine was built
    probe = KVCacheProbe(llm)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.kv_bytes_in_training == [0, 0, 0]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 3 and all(h["completions/mean_length"] > 0 for h in logs)
    # The rollouts came from weights in sync with the trainer's.
    assert all(h["sampling/sampling_logp_difference/mean"] < 0.05 for h in logs)
