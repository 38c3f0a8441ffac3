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
