"""`longctx-grpo plan`: the printed plan, defaults from the machine it runs on, GPU presets, flag errors, and `--help`
and bad values answered without importing torch, transformers, TRL or vLLM."""

import json
import subprocess
import sys

import pytest

from trl_longctx.memory import plan_cli
from trl_longctx.memory.machine import GPUS_GIB, HOST_RESERVE_GIB
from trl_longctx.memory.plan_cli import main as plan_main
from trl_longctx.memory.presets import PRESETS
from trl_longctx.memory.shapes import GIB

HEAVY = ("torch", "transformers", "trl", "vllm")


@pytest.fixture
def machine(monkeypatch):
    """A machine with one 48 GiB CUDA GPU and 125 GiB of memory; `machine.asked` counts the GPU look-ups."""

    class Machine:
        asked = 0

        @classmethod
        def cuda_gpu(cls):
            cls.asked += 1
            return ("NVIDIA Test", 48.0)

    monkeypatch.setattr(plan_cli, "cuda_gpu", Machine.cuda_gpu)
    monkeypatch.setattr(plan_cli, "host_memory_gib", lambda: 125.0)
    return Machine


def plan_lines(out):
    return [line for line in out.splitlines() if "longest completion that fits" in line]


def test_defaults_come_from_this_machine(machine, capsys):
    plan_main([])
    out = capsys.readouterr().out
    assert out.startswith("GPU: NVIDIA Test (48 GiB), this machine's, from torch.cuda.\n")
    assert (
        f"Host memory the offloaded checkpoints may pin: 109 GiB (this machine's 125.0 GiB less {HOST_RESERVE_GIB:g})."
        in out
    )
    for text in ("model qwen3-8b", "model llama3.1-8b", "TRL 1.16 default (fused_lm_head)", "| weights |",
                 "| checkpointed layer inputs on GPU |", "NVIDIA Test (48 GiB), ours"):  # fmt: skip
        assert text in out
    assert len(plan_lines(out)) == 4  # 2 models x 2 paths x this GPU
    assert machine.asked == 1


def test_without_cuda_every_preset_is_planned(monkeypatch, capsys):
    monkeypatch.setattr(plan_cli, "cuda_gpu", lambda: None)
    monkeypatch.setattr(plan_cli, "host_memory_gib", lambda: None)
    plan_main(["--model", "qwen3-8b", "--paths", "ours"])
    out = capsys.readouterr().out
    assert out.startswith("GPU: every preset (no CUDA GPU here; choose with --gpu or --gpu-memory-gib).\n")
    assert "may pin: not limited (this machine's memory is unknown; set --host-memory-gib)." in out
    assert [line.split(" (")[0] for line in plan_lines(out)] == list(GPUS_GIB)
    assert "H100 80GB (79.2 GiB), ours" in out


def test_named_gpus_skip_the_machine(machine, capsys):
    flags = ["--gpu", "H100 80GB", "h200", "A100", "--gpu-memory-gib", "40", "--host-memory-gib", "50"]
    plan_main([*flags, "--paths", "ours"])
    out = capsys.readouterr().out
    assert machine.asked == 0
    header = (
        "GPU: H100 80GB (79.2 GiB), H200 141GB ({:g} GiB), A100 40GB ({:g} GiB), A100 80GB (79.2 GiB), GPU (40 GiB)"
    )
    assert out.startswith(header.format(GPUS_GIB["H200 141GB"], GPUS_GIB["A100 40GB"]) + " (as given).\n")
    assert "may pin: 50 GiB (as given)." in out
    assert len(plan_lines(out)) == 2 * 5


def test_plan_verdict_counts_host_memory_as_the_longest_completion_does(capsys):
    """Qwen3-32B, 2 x (256 + 98,304) tokens, one sequence per pass: the GPU holds it, but the offloaded checkpoints
    (118 GiB) exceed the host memory allowed (109 GiB), so the verdict agrees with the longest completion (90,368
    tokens) instead of saying "fits"."""
    flags = ["--model", "qwen3-32b", "--gpu-memory-gib", "139.8", "--host-memory-gib", "109", "--paths", "ours",
             "--grpo-mini-batch", "1"]  # fmt: skip
    plan_main([*flags, "--completion-length", "98304"])
    out = capsys.readouterr().out
    assert "98304 completion tokens does NOT fit in host memory (118.43 GiB to pin, 109 GiB allowed)" in out
    assert "longest completion that fits: 90368 tokens" in out
    plan_main([*flags, "--completion-length", "65536"])
    assert "65536 completion tokens fits;" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--model", "gpt-9"],
            "--model must be one of the presets ['gpt-oss-20b', 'llama3.1-8b', 'qwen3-1.7b', 'qwen3-30b-a3b', "
            "'qwen3-32b', 'qwen3-8b', 'qwen3-vl-8b'] or a path to a config.json, got 'gpt-9'.",
        ),  # fmt: skip
        (
            ["--model", "qwen3-8b", "--lora-experts"],
            "--lora-experts needs Mixture-of-Experts models, got 'qwen3-8b' (no experts).",
        ),
        (
            ["--model", "gpt-oss-20b", "--lora-experts", "--mode", "full"],
            "--lora-experts needs --mode lora or qlora (full fine-tuning has no adapters), got full.",
        ),
        (["--completion-length", "-5"], "--completion-length must be >= 1, got -5."),
        (["--prompt-length", "-1"], "--prompt-length must be >= 0, got -1."),
        (["--num-generations", "0"], "--num-generations must be >= 1, got 0."),
        (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0."),
        (["--mode", "dora"], "--mode must be one of ['lora', 'qlora', 'full'], got 'dora'."),
        (["--gpu-memory-gib", "0"], "--gpu-memory-gib must be > 0, got 0.0."),
        (["--host-memory-gib", "-1"], "--host-memory-gib must be > 0, got -1.0."),
        (["--gpu", "TPU"], f"--gpu 'TPU' is not a preset; allowed: {list(GPUS_GIB)}, or use --gpu-memory-gib."),
        (
            ["--paths", "liger"],
            "--paths must be among ['ours', 'trl', 'ours-no-offload', 'materialized'], got ['liger']",
        ),
        (["--grpo-mini-batch", "3"], "--grpo-mini-batch must be in 1..--num-generations, got 3."),
        (["--nf4-nested-scales"], "--nf4-nested-scales needs --mode qlora (4-bit weights), got lora."),
    ],
)
def test_bad_flags_name_the_flag_the_value_and_what_is_allowed(machine, flags, message):
    with pytest.raises(SystemExit) as error:
        plan_main(flags)
    assert str(error.value).startswith(f"longctx-grpo plan: {message}")
    assert machine.asked == 0  # refused before the machine is asked


def test_nested_scales_weigh_less_and_are_not_shared(capsys):
    """TRL's default QLoRA (no nested scales) is planned at 4 bits and a float32 scale per 64 weights, as vLLM holds
    them; `--nf4-nested-scales` at ~0.127 bits of scales, and the plan says vLLM's copy is then a second one."""
    flags = ["--model", "qwen3-8b", "--gpu-memory-gib", "80", "--mode", "qlora", "--paths", "ours"]
    plan_main(flags)
    plain = capsys.readouterr().out
    plan_main([*flags, "--nf4-nested-scales"])
    nested = capsys.readouterr().out
    shape = PRESETS["qwen3-8b"]
    saved = shape.linear_params() * (4 / 64 - 0.127 / 8) / GIB
    assert float(_row(plain, "weights")) - float(_row(nested, "weights")) == pytest.approx(saved, abs=0.01)
    assert "copy stays beside the trainer's while it trains" in nested and "stays beside" not in plain


def _row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"| {name} |")).split("|")[2].strip()


def test_longctx_grpo_plan_command(capsys):
    from trl_longctx.cli import main

    main(["plan", "--model", "llama3.1-8b", "--gpu-memory-gib", "80", "--mode", "qlora", "--paths", "ours"])
    assert "GPU (80 GiB), ours (offloaded checkpoints + selective_logprobs)" in capsys.readouterr().out


PROBE = f"""
import json, sys
from trl_longctx.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exit:
    code = exit.code if exit.code is None or isinstance(exit.code, int) else str(exit.code)
print(json.dumps({{"code": code, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["plan", "--help"], 0),
        (["plan", "--completion-length", "-5"], "longctx-grpo plan: --completion-length must be >= 1, got -5."),
        (["plan", "--gpu", "TPU"], "longctx-grpo plan: --gpu 'TPU' is not a preset"),
        (["plan", "--model", "gpt-9"], "longctx-grpo plan: --model must be one of the presets"),
        (["plan", "--bogus"], 2),  # argparse's own error
        (["plan", "--gpu", "H100", "--model", "qwen3-8b", "--paths", "ours"], 0),  # a whole plan, GPU named
        (["--help"], 0),
        (["trian"], "longctx-grpo: unknown command 'trian'; allowed: train, plan."),
    ],
)
def test_plan_answers_without_importing_torch_trl_transformers_or_vllm(argv, code):
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["heavy"] == [], f"{report['heavy']} imported (by trl_longctx/__init__.py?): {result.stderr[-2000:]}"
    if isinstance(code, str):
        assert report["code"].startswith(code)
    else:
        assert report["code"] == code


def test_python_m_plan_help_imports_nothing_heavy():
    """The command as typed, `python -m trl_longctx.cli plan --help`, under `-X importtime` (every module imported is
    listed on stderr)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "trl_longctx.cli", "plan", "--help"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: longctx-grpo plan" in result.stdout and "--gpu-memory-gib" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert "trl_longctx" in imported
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


def test_moe_presets_show_their_terms(capsys):
    """Qwen3-30B-A3B with LoRA on its experts: the aux loss's router logits and the adapted expert weights are rows of
    the plan; `--no-router-aux-loss` drops the first."""
    flags = ["--model", "qwen3-30b-a3b", "--gpu", "H100 80GB", "--host-memory-gib", "200", "--paths", "ours"]
    plan_main([*flags, "--lora-experts"])
    out = capsys.readouterr().out
    assert "| router logits kept for the aux loss |" in out and "| adapted expert weights (LoRA on experts) |" in out
    plan_main([*flags, "--no-router-aux-loss"])
    out = capsys.readouterr().out
    assert "router logits" not in out and "adapted expert weights" not in out


def test_moe_plans_share_bf16_experts_and_keep_trls_engine_for_4bit(capsys):
    """bf16 MoE checkpoints share their experts with vLLM (one copy, the rollout modeled); 4-bit ones keep TRL's
    engine: the plan does not claim one copy of the weights."""
    flags = ["--model", "qwen3-30b-a3b", "--gpu", "H200 141GB", "--completion-length", "8192", "--paths", "ours",
             "--host-memory-gib", "100"]  # fmt: skip
    plan_main(flags)
    out = capsys.readouterr().out
    assert "not modeled" not in out and "one copy of the weights" in out
    plan_main([*flags, "--mode", "qlora"])
    out = capsys.readouterr().out
    assert (
        "vLLM side: not modeled (4-bit Mixture-of-Experts models keep TRL's engine" in out
        and "one copy of the weights" not in out
    )


def test_vision_flags_plan_the_tower(capsys):
    """qwen3-vl-8b with images: a trained tower's saved tensors are a row; its weights are counted; the vLLM side
    says TRL's engine keeps a second copy of 4-bit weights, and that bf16 ones are shared; bad combinations name the
    flag."""
    from trl_longctx.memory.presets import PRESETS

    flags = ["--model", "qwen3-vl-8b", "--gpu", "24GB", "--mode", "qlora", "--prompt-length", "8192",
             "--completion-length", "4096", "--paths", "ours", "--host-memory-gib", "50"]  # fmt: skip
    plan_main([*flags, "--vision-patches", "4096", "--vision-trained"])
    trained = capsys.readouterr().out
    plan_main([*flags, "--vision-patches", "4096"])
    frozen = capsys.readouterr().out
    assert "| vision tower saved tensors |" in trained and "vision tower saved tensors" not in frozen
    assert "vLLM side: not modeled (4-bit vision-language models keep TRL's engine" in frozen
    assert "rollout not modeled (4-bit vision-language models keep TRL's engine" in frozen
    # LoRA on bf16 weights: shared with vLLM, the tower's included, so the rollout is planned.
    plan_main([*flags[:5], "lora", *flags[6:], "--vision-patches", "4096"])
    shared = capsys.readouterr().out
    assert "vLLM side: not modeled" not in shared and "rollout not modeled" not in shared
    assert 0.5e9 < PRESETS["qwen3-vl-8b"].vision.params < 0.6e9  # Qwen3-VL-8B's tower: 0.58B
    assert PRESETS["qwen3-vl-8b"].total_params() - PRESETS["qwen3-8b"].total_params() == (
        PRESETS["qwen3-vl-8b"].vision.params
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "qwen3-8b", "--vision-patches", "16"], "need vision-language models .* got 'qwen3-8b'"),
        (["--model", "qwen3-vl-8b", "--vision-patches", "-1"], r"--vision-patches must be >= 0, got -1"),
        (["--model", "qwen3-vl-8b", "--vision-trained"], r"--vision-trained needs --vision-patches > 0"),
    ],
)
def test_bad_vision_flags_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        plan_main([*argv, "--gpu", "24GB"])


def test_sequence_parallel_plans_one_ranks_slices(capsys):
    """`--sequence-parallel 4`: one rank's share, num-generations x 4 slices of a quarter of the tokens, one per
    decoder pass; the longest completion is of whole rows (4 x a slice's); the rollout stays whole rows."""
    from trl_longctx.memory.planner import TrainSetup, longest_completion
    from trl_longctx.memory.presets import PRESETS

    plan_main(["--model", "qwen3-8b", "--gpu-memory-gib", "80", "--host-memory-gib", "400", "--paths", "ours",
               "--prompt-length", "256", "--completion-length", "131072", "--sequence-parallel", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert "split over 4 processes: each rank runs 8 slices of (64 + 32768) tokens, one per decoder pass" in out
    slices = TrainSetup(8, 64, 32768, grpo_mini_batch=1, lora_dropout=True)  # TRL's default dropout 0.05
    longest = 4 * longest_completion(PRESETS["qwen3-8b"], slices, 80, tile_mlps=True, host_memory_gib=400)
    assert (
        f"split over 4 processes: 131072 completion tokens fits; longest completion that fits: {longest} tokens" in out
    )
    assert "the rollout of 2 x (256 + 131072) tokens" in out and "Most sequences" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sequence-parallel", "0", "--paths", "ours"], r"--sequence-parallel must be >= 1, got 0"),
        (
            ["--sequence-parallel", "2"],
            r"--sequence-parallel 2 plans our path only: use --paths ours, got \['ours', 'trl'\]",
        ),
    ],
)
def test_bad_sequence_parallel_flags_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        plan_main([*argv, "--gpu", "24GB"])


def test_lora_dropout_default_is_trls():
    """`--lora-dropout`'s default is TRL's `ModelConfig.lora_dropout`, what `longctx-grpo train` passes to PEFT."""
    from trl import ModelConfig

    from trl_longctx.memory.plan_cli import LORA_DROPOUT_DEFAULT

    assert ModelConfig().lora_dropout == LORA_DROPOUT_DEFAULT


def test_lora_dropout_flag_changes_the_plan(capsys):
    argv = ["--model", "qwen3-8b", "--gpu-memory-gib", "80", "--host-memory-gib", "400", "--paths", "ours",
            "--mode", "qlora", "--prompt-length", "1024", "--completion-length", "8192"]  # fmt: skip
    plan_main(argv)
    assert "LoRA dropout masks and outputs (1 layer)" in capsys.readouterr().out
    plan_main([*argv, "--lora-dropout", "0"])
    assert "LoRA dropout" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--lora-dropout must be in \[0, 1\), got 1.5"):
        plan_main([*argv, "--lora-dropout", "1.5"])
