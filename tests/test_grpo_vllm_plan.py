"""A TRL user's own colocate config with only the import changed, on the real vLLM CPU build: the rollout plan's rows.

TRL's docs teach colocate mode with `vllm_enable_sleep_mode=True` at `vllm_gpu_memory_utilization=0.3`. With the import
changed that config trains with shared weights (one copy: the trainer's base tensors are vLLM's) and KV-only standby,
and the log says so; each config that cannot share is warned about, naming the setting that would turn sharing on.
The plan's rows for other platforms and vLLM versions are `packages/trl_longctx/tests/test_rollout_plan.py`.
"""

import dataclasses
import inspect
import logging

import pytest

pytest.importorskip("vllm")

from conftest import DISTRIBUTED_ENV, storage_ptrs  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

from vllm_standby import _worker, kv_cache_nbytes  # noqa: E402

pytestmark = pytest.mark.slow

PLAN_LOGGER = "trl_longctx.longctx_grpo_trainer"


class KVCacheProbe(TrainerCallback):
    """The bytes held by vLLM's KV cache after each optimizer step (while the trainer trains)."""

    def __init__(self, llm):
        self.llm, self.kv_bytes_in_training = llm, []

    def on_step_end(self, args, state, control, **kwargs):
        self.kv_bytes_in_training.append(kv_cache_nbytes(self.llm))


def trl_docs_config(tmp_path, **overrides):
    """TRL's colocate config as its docs teach it, built from our config class (the only change)."""
    from trl_longctx import LongContextGRPOConfig

    settings = {
        "output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
        "max_completion_length": 6, "learning_rate": 5e-2, "logging_steps": 1, "report_to": "none", "use_cpu": True,
        "bf16": False, "save_strategy": "no", "disable_tqdm": True, "use_vllm": True, "vllm_mode": "colocate",
        "vllm_enable_sleep_mode": True, "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": 64,
    }  # fmt: skip
    return LongContextGRPOConfig(**{**settings, **overrides})


def build(tmp_path, monkeypatch, args, model=None, peft=True):
    from peft import LoraConfig

    from trl_longctx import LongContextGRPOTrainer
    from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset
    from trl_longctx.tiny_models import save_tiny_model

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    path = str(save_tiny_model(tmp_path / "model"))
    return LongContextGRPOTrainer(
        model=path if model is None else model(path), reward_funcs=copy_letter_reward, args=args,
        train_dataset=make_copy_letter_dataset(32),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if peft else None,
    )  # fmt: skip


def settings(args):
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}


def test_trl_sleep_mode_config_trains_with_shared_weights_and_kv_standby(tmp_path, monkeypatch, caplog):
    from trl import GRPOTrainer

    from trl_longctx.longctx_grpo_trainer import MODEL_INIT_KWARGS_NOTE

    args = trl_docs_config(tmp_path, model_init_kwargs={"dtype": "float32"})
    before = settings(args)
    with caplog.at_level(logging.WARNING, logger=PLAN_LOGGER), caplog.at_level(logging.WARNING, logger="trl"):
        trainer = build(tmp_path, monkeypatch, args)
    # The shared model was built from model_init_kwargs: TRL's note that they are ignored is not shown. (The note is
    # TRL's text: were it reworded, the filter would miss it and this check would pass, hence the source check.)
    assert not [r for r in caplog.records if MODEL_INIT_KWARGS_NOTE in r.getMessage()]
    assert MODEL_INIT_KWARGS_NOTE in inspect.getsource(GRPOTrainer.__init__)
    plan = trainer.rollout_plan
    assert (plan.shared_weights, plan.kv_standby, plan.notices) == (True, "trainer", ())
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Rollout plan:")]
    assert "shared with the trainer (one copy)" in line and "KV cache released while training" in line
    assert "vllm_enable_sleep_mode=True is honoured" in line
    llm = trainer.vllm_generation.llm
    vllm_weights = llm.collective_rpc(_worker.model_of)[0].parameters()
    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert storage_ptrs(base) <= storage_ptrs(vllm_weights)
    probe = KVCacheProbe(llm)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.kv_bytes_in_training == [0, 0]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all(h["sampling/sampling_logp_difference/mean"] < 0.05 for h in logs)
    assert settings(args) == before  # the config object the user passed is not modified


def test_full_finetuning_with_trls_sleep_mode_config_trains_on_cpu(tmp_path, monkeypatch, caplog):
    """No LoRA: TRL's own engine (a copy of the weights). vLLM's CPU build has no sleep mode, so TRL's config used to
    fail there; now its intent is honoured by the trainer's KV standby, and the warning names what would share."""
    args = trl_docs_config(tmp_path, max_steps=1, learning_rate=1e-4)
    with caplog.at_level(logging.WARNING, logger=PLAN_LOGGER):
        trainer = build(tmp_path, monkeypatch, args, peft=False)
    plan = trainer.rollout_plan
    assert (plan.shared_weights, plan.kv_standby, plan.trl_sleep_mode) == (False, "trainer", False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("shared weights off" in m and "peft_config=LoraConfig(...)" in m for m in messages)
    assert any("vLLM's CPU build has no sleep mode" in m for m in messages if m.startswith("Rollout plan:"))
    assert trainer.vllm_generation.enable_sleep_mode is False and trainer.args.vllm_enable_sleep_mode is True
    probe = KVCacheProbe(trainer.vllm_generation.llm)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.kv_bytes_in_training == [0]
    assert [h["step"] for h in trainer.state.log_history if "reward" in h] == [1]


@pytest.mark.parametrize(
    ("overrides", "model", "remedy"),
    [
        ({}, AutoModelForCausalLM.from_pretrained, "pass the model as a path or id (model='...')"),
        ({"vllm_shared_weights": False}, None, "vllm_shared_weights=None (or True)"),
    ],
    ids=["model-instance", "sharing-switched-off"],
)
def test_configs_that_cannot_share_warn_with_the_setting(tmp_path, monkeypatch, caplog, overrides, model, remedy):
    args = trl_docs_config(tmp_path, **overrides)
    with caplog.at_level(logging.WARNING, logger=PLAN_LOGGER):
        trainer = build(tmp_path, monkeypatch, args, model=model)
    assert not trainer.rollout_plan.shared_weights and trainer.rollout_plan.kv_standby == "trainer"
    warnings = [r.getMessage() for r in caplog.records if "shared weights off" in r.getMessage()]
    assert len(warnings) == 1 and remedy in warnings[0]
    llm = trainer.vllm_generation.llm
    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert not storage_ptrs(base) & storage_ptrs(llm.collective_rpc(_worker.model_of)[0].parameters())
    assert kv_cache_nbytes(llm) == 0  # released until the first rollout
