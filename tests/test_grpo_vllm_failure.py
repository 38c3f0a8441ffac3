"""vLLM failing mid-run (real CPU engine, colocated): a clear error naming the step; the last checkpoint resumes."""

import pytest

pytest.importorskip("vllm")

from conftest import colocated_grpo_trainer  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402
from vllm.v1.engine.exceptions import EngineGenerateError  # noqa: E402

pytestmark = pytest.mark.slow

FAILING_CALL = 3  # one `LLM.generate` per step here (one generation batch per optimizer step)
CHECKPOINT_FILES = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def fail_once(llm, monkeypatch, at_call):
    """Make the engine's `generate` raise on call number `at_call` (counted from 1) and work before and after."""
    original, calls = llm.generate, []

    def generate(*args, **kwargs):
        calls.append(None)
        if len(calls) == at_call:
            raise EngineGenerateError("injected fault: generation aborted")
        return original(*args, **kwargs)

    monkeypatch.setattr(llm, "generate", generate)
    return calls


def test_generation_failure_names_the_step_and_the_last_checkpoint_resumes(tmp_path, monkeypatch):
    trainer = colocated_grpo_trainer(
        tmp_path, monkeypatch, vllm_gpu_memory_utilization=0.1, save_strategy="steps", save_steps=1
    )
    run_dir = tmp_path / "run"
    calls = fail_once(trainer.vllm_generation.llm, monkeypatch, at_call=FAILING_CALL)

    with pytest.raises(RuntimeError, match=f"vLLM generation failed at step {FAILING_CALL}: EngineGenerateError") as e:
        trainer.train()
    assert isinstance(e.value.__cause__, EngineGenerateError)
    assert len(calls) == FAILING_CALL
    # Checkpoints of the steps before are complete, nothing of the failed step exists.
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]
    last = get_last_checkpoint(str(run_dir))
    assert last == str(run_dir / "checkpoint-2")
    assert {p.name for p in (run_dir / "checkpoint-2").iterdir()} >= CHECKPOINT_FILES

    # The engine works again (a transient fault): resume from the last checkpoint and finish the run.
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3 and len(calls) == FAILING_CALL + 1
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert [h["step"] for h in logs] == [1, 2, 3] and logs[-1]["completions/mean_length"] > 0
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-3")


def fail_inside_the_engine(llm, monkeypatch, at_generate, after_steps=2):
    """Make the engine's model executor raise inside `generate` call number `at_generate`, after `after_steps` engine
    steps of it ran (the prompts' prefill and a decode step): vLLM fails mid-rollout with its requests unfinished."""
    executor, original = llm.llm_engine.model_executor, llm.llm_engine.model_executor.execute_model
    state = {"generate_calls": 0, "steps": 0}
    original_generate = llm.generate

    def generate(*args, **kwargs):
        state["generate_calls"] += 1
        state["steps"] = 0
        return original_generate(*args, **kwargs)

    def execute_model(*args, **kwargs):
        state["steps"] += 1
        if state["generate_calls"] == at_generate and state["steps"] > after_steps:
            raise RuntimeError("injected fault inside the engine's step")
        return original(*args, **kwargs)

    monkeypatch.setattr(llm, "generate", generate)
    monkeypatch.setattr(executor, "execute_model", execute_model)
    return state


def test_engine_failure_mid_rollout_is_reported_as_itself_and_the_run_goes_on(tmp_path, monkeypatch):
    """vLLM fails inside its engine step, mid-rollout: the error names the step and the engine's own error (not the
    KV release that follows it), the engine's unfinished requests are aborted and its KV cache released; the last
    checkpoint resumes on the same engine and the run finishes."""
    from vllm_standby import kv_cache_nbytes

    trainer = colocated_grpo_trainer(
        tmp_path, monkeypatch, vllm_gpu_memory_utilization=0.1, save_strategy="steps", save_steps=1
    )
    llm = trainer.vllm_generation.llm
    state = fail_inside_the_engine(llm, monkeypatch, at_generate=FAILING_CALL)
    with pytest.raises(RuntimeError, match=f"vLLM generation failed at step {FAILING_CALL}: RuntimeError: injected "
                       "fault inside the engine's step") as e:  # fmt: skip
        trainer.train()
    assert "unfinished" not in str(e.value) and state["steps"] == 3  # it failed mid-rollout, as injected
    assert not llm.llm_engine.has_unfinished_requests()
    assert kv_cache_nbytes(llm) == 0  # released: the memory is the trainer's again
    assert get_last_checkpoint(str(tmp_path / "run")) == str(tmp_path / "run" / f"checkpoint-{FAILING_CALL - 1}")

    state["generate_calls"] = -100  # the fault was transient
    trainer.train(resume_from_checkpoint=True)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert trainer.state.global_step == 3 and logs[-1]["step"] == 3 and logs[-1]["completions/mean_length"] > 0
