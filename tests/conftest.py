from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Set in os.environ by TRL's colocate mode (for vLLM's external launcher); a child process that inherits them would
# try to join this process's rendezvous (and its port).
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def storage_ptrs(tensors) -> set[int]:
    """The data pointers of the storages `tensors` live in: a set of vLLM's is a superset of the trainer's where the
    trainer's weights are views of vLLM's (one copy in memory)."""
    return {t.untyped_storage().data_ptr() for t in tensors}


def colocated_grpo_trainer(tmp_path: Path, monkeypatch, peft_config=None, **overrides):
    """A `LongContextGRPOTrainer` on a tiny Qwen3 with vLLM's CPU build colocated in this process (3 short steps)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)  # restored to absent after the test, whatever TRL sets
    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset
    from trl_longctx.tiny_models import save_tiny_model

    settings = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "save_strategy": "no",
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_max_model_length": 64,
        "disable_tqdm": True,
    }
    return LongContextGRPOTrainer(
        model=str(save_tiny_model(tmp_path / "model")),
        reward_funcs=copy_letter_reward,
        args=LongContextGRPOConfig(**{**settings, **overrides}),
        train_dataset=make_copy_letter_dataset(64),
        peft_config=peft_config,
    )


def pytest_collection_modifyitems(session, config, items):
    """Run the quickstart subprocesses (timed run, 500-step memory run) first: vLLM engines built in this process by
    other tests keep threads that compete for the 2 cores (seen: 307 s instead of about 130 s when it ran after them)."""
    first = ("test_quickstart", "test_quickstart_memory")
    items.sort(key=lambda item: first.index(item.module.__name__) if item.module.__name__ in first else len(first))
