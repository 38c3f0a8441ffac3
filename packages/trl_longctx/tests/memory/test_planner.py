"""Memory planner and `longctx-grpo plan`: arithmetic, monotonicity, flag errors, config.json input."""

import json

import pytest

from trl_longctx.memory import PRESETS, TrainSetup, load_model_shape, longest_completion, plan_memory
from trl_longctx.memory.plan_cli import main as plan_main
from trl_longctx.memory.planner import GIB

QWEN3_8B = PRESETS["qwen3-8b"]


def test_weights_and_checkpoints_arithmetic():
    plan = plan_memory(QWEN3_8B, TrainSetup(2, 256, 32768, offload_checkpoints=False))
    # Qwen3-8B has 8.19e9 parameters: 15.3 GiB in bf16.
    assert plan.components["weights"] / GIB == pytest.approx(15.26, abs=0.05)
    # 36 layers x 2 x 33,024 tokens x 4096 x 2 bytes.
    assert plan.components["checkpointed layer inputs"] == 36 * 2 * 33024 * 4096 * 2
    offloaded = plan_memory(QWEN3_8B, TrainSetup(2, 256, 32768, offload_checkpoints=True))
    assert offloaded.components["checkpointed layer inputs"] == 2 * 2 * 33024 * 4096 * 2


def test_against_peaks_measured_on_the_h200():
    # ../shared/GPU.md, one GRPO step on the lent H200: TRL default and TRL + Liger (a fused log-prob path).
    measured = {("materialized", 16384): 62.4, ("materialized", 32768): 109.0, ("fused", 81920): 121.2}
    for (path, length), gib in measured.items():
        plan = plan_memory(QWEN3_8B, TrainSetup(2, 256, length, offload_checkpoints=False, logprob_path=path))
        assert plan.allocated / GIB == pytest.approx(gib, rel=0.10), (path, length)


def test_modes_and_longest_completion():
    setups = {mode: TrainSetup(2, 256, 8192, mode=mode) for mode in ("lora", "qlora", "full")}
    totals = {mode: plan_memory(QWEN3_8B, s).total for mode, s in setups.items()}
    assert totals["qlora"] < totals["lora"] < totals["full"]
    setup = setups["lora"]
    longest = longest_completion(QWEN3_8B, setup, 80)
    assert longest % 256 == 0 and longest > 0
    fits = TrainSetup(2, 256, longest)
    too_long = TrainSetup(2, 256, longest + 256)
    assert plan_memory(QWEN3_8B, fits).total <= 80 * GIB < plan_memory(QWEN3_8B, too_long).total
    assert longest_completion(QWEN3_8B, setup, 1) == 0


def test_config_json_matches_preset(tmp_path):
    config = {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model_shape(str(tmp_path)) == QWEN3_8B


def test_plan_prints_table(capsys):
    plan_main(["--model", "qwen3-8b", "--gpu-memory-gib", "80", "--completion-length", "32768"])
    out = capsys.readouterr().out
    assert "| checkpointed layer inputs |" in out and "Longest completion that fits in 80 GiB" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "gpt-9"], "--model must be one of the presets"),
        (["--completion-length", "-5"], "--completion-length must be >= 1"),
        (["--prompt-length", "-1"], "--prompt-length must be >= 0"),
        (["--num-generations", "0"], "--num-generations must be >= 1"),
        (["--mode", "dora"], "--mode must be one of"),
        (["--gpu-memory-gib", "0"], "--gpu-memory-gib must be > 0"),
    ],
)
def test_bad_flags_name_the_flag(flags, message):
    argv = {"--model": "qwen3-8b", "--gpu-memory-gib": "80"}
    argv.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    with pytest.raises(SystemExit, match=message):
        plan_main([x for pair in argv.items() for x in pair])


def test_longctx_grpo_plan_command(capsys):
    from trl_longctx.cli import main

    main(["plan", "--model", "llama3.1-8b", "--gpu-memory-gib", "80", "--mode", "qlora"])
    assert "Longest completion that fits in 80 GiB" in capsys.readouterr().out
