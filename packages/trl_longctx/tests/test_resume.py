"""Resuming a run: metrics.jsonl keeps the records up to the resumed step and drops what the crashed run logged later."""

import json

from transformers import TrainerControl, TrainerState, TrainingArguments

from trl_longctx.metrics_callback import RunFilesCallback


def write_records(path, steps):
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in steps))


def begin(run_dir, global_step):
    callback = RunFilesCallback(run_dir)
    state = TrainerState(global_step=global_step)
    callback.on_train_begin(TrainingArguments(output_dir=str(run_dir), report_to="none"), state, TrainerControl())
    return callback, [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_keeps_records_up_to_the_checkpoint(tmp_path):
    # The killed run logged steps 1-5; its last checkpoint is step 4.
    write_records(tmp_path / "metrics.jsonl", [1, 2, 3, 4, 5])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # SIGKILL in the middle of an append
    callback, steps = begin(tmp_path, global_step=4)
    assert steps == [1, 2, 3, 4]
    assert [r["step"] for r in callback.records] == [1, 2, 3, 4]  # the summary's reward curve covers the whole run
    assert not list(tmp_path.glob("*.tmp"))


def test_fresh_run_starts_a_fresh_file(tmp_path):
    write_records(tmp_path / "metrics.jsonl", [1, 2, 3])
    callback, steps = begin(tmp_path, global_step=0)
    assert steps == [] and callback.records == []
