"""torch.compile settings of the training path: compile time and step time of one GRPO step, per setting.

Model and step: those of `grpo_step.py` (imported, not copied): the `--model` preset's architecture with random bf16
weights on CUDA, PEFT LoRA r=`--lora-rank` on every linear layer, non-reentrant gradient checkpointing, the ``ours``
path (`CheckpointOffloader.offload` + `longctx_kernels.selective_logprobs`, `--mlp-tiles` MLP tiles, all sequences
in one decoder pass), TRL's GRPO loss at ratio 1, backward and an AdamW step. Batch: `--num-generations` sequences
of `--prompt-length + L` random tokens.

Each setting of `trl_longctx.compile_regions.COMPILE_SETTINGS`, and ``eager`` (not compiled: the config's
`compile_decoder_layers=None`), runs in its own Python subprocess (fresh dynamo state, and by default a fresh, empty
inductor/Triton cache, so the first step pays the full compilation as on a new machine), with `TORCH_LOGS` unset. In
order, it times:
- ``first_s``: the first step at L (compilation included, and the pinned host buffers' allocation);
- ``second_length_s``: one step at L2 (a new length: recompilation, unless the setting is dynamic already);
- ``steady_s``: the median of `--steps` steps at L after those (p20/p80 and every sample in the JSON);
and records dynamo's compiled frames (``compiles``: first compiles and recompiles; ``compiles_at_L2``: those during
the L2 step) and graph breaks (counted while tracing, not per step), and the peak allocated GPU memory (weights
included) of the steady-state steps (``peak_GiB``) and of the two steps before them (``peak_GiB_first_steps``).

Rows are printed and written to `--out` as each setting finishes (a setting that runs past its time keeps the parts
it finished, status "timeout"); then a markdown table with ratios to ``eager``.

Example (one H200, about 9 minutes):
    PYTHONPATH=packages/trl_longctx/src:packages/kernels/src:packages/vllm_standby/src \\
        python tools/bench/compile_step.py --out docs/bench/compile_step.json
CPU smoke test (tiny Qwen3, float32):
    PYTHONPATH=... python tools/bench/compile_step.py --tiny --lengths 48 40 --out /tmp/compile_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, _sync, _text, environment, markdown_table, summarize  # noqa: E402

# The baseline's row name: the model not compiled (`compile_decoder_layers(model, None)`).
EAGER = "eager"
# Cheapest first, so that a run cut short still has the baseline and the main candidates.
DEFAULT_SETTINGS = (
    EAGER,
    "layers",
    "layers-mark-dynamic",
    "layers-dynamic",
    "model",
    "layers-max-autotune-no-cudagraphs",
)
ROW_PREFIX = "ROW "


def build_tiny_model(lora_rank: int):
    """Tiny random Qwen3 (2 layers, H=128, float32, CPU) with LoRA and checkpointing, for the smoke test only."""
    from peft import LoraConfig, get_peft_model

    from trl_longctx.tiny_models import build_tiny_qwen3

    model = build_tiny_qwen3(vocab_size=256, max_position_embeddings=4096)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear"))
    model.enable_input_require_grads()
    return model.train()


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"compiles": counters["frames"]["ok"], "graph_breaks": sum(counters["graph_break"].values())}


def _timed(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def worker(args) -> None:
    """Measure one setting in this process; print a `ROW {json}` line after each phase (the last one is complete)."""
    from grpo_step import build_model, make_step

    from trl_longctx.compile_regions import compile_decoder_layers
    from trl_longctx.memory import CheckpointOffloader

    device = torch.device("cpu" if args.tiny else "cuda")
    start = time.perf_counter()
    model = build_tiny_model(args.lora_rank) if args.tiny else build_model(args.model, args.lora_rank)[0]
    vocab_size = model.config.vocab_size
    row = {"setting": args.setting, "model": "tiny-qwen3" if args.tiny else args.model, "L": args.lengths[0],
           "L2": args.lengths[1], "B": args.num_generations, "prompt_length": args.prompt_length,
           "mlp_tiles": args.mlp_tiles, "build_s": time.perf_counter() - start, "status": "running"}  # fmt: skip
    row["compiled_modules"] = compile_decoder_layers(model, None if args.setting == EAGER else args.setting)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    offloader = CheckpointOffloader()
    peak = {"key": "peak_GiB_first_steps"}  # then "peak_GiB", once the steady-state steps start

    def step_at(length: int):
        torch.manual_seed(length)
        ids = torch.randint(0, vocab_size, (args.num_generations, args.prompt_length + length), device=device)
        return make_step("ours", model, optimizer, ids, length, offloader, (None, args.mlp_tiles))

    def emit(**update):
        row.update(update, **_dynamo_counts())
        if device.type == "cuda":
            row[peak["key"]] = torch.cuda.max_memory_allocated(device) / GIB
        print(ROW_PREFIX + json.dumps(row), flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = step_at(args.lengths[0])
    emit(first_s=_timed(first, device))
    before = _dynamo_counts()["compiles"]
    emit(second_length_s=_timed(step_at(args.lengths[1]), device))
    row["compiles_at_L2"] = row["compiles"] - before
    before = row["compiles"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        peak["key"] = "peak_GiB"
    samples = [_timed(first, device) for _ in range(args.steps)]
    emit(steady_s=summarize(samples)["p50"], steady=summarize(samples), steady_all=samples)
    emit(compiles_in_steady=row["compiles"] - before, status="ok")
    offloader.release()


def run_setting(setting: str, args, timeout_s: float) -> dict:
    """Run `worker` for `setting` in a subprocess; return its last row (status "timeout"/"failed" when cut short)."""
    command = [sys.executable, __file__, "--worker", "--setting", setting, "--model", args.model,
               "--lengths", *map(str, args.lengths), "--steps", str(args.steps),
               "--num-generations", str(args.num_generations), "--prompt-length", str(args.prompt_length),
               "--lora-rank", str(args.lora_rank), "--mlp-tiles", str(args.mlp_tiles)]  # fmt: skip
    if args.tiny:
        command.append("--tiny")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    with tempfile.TemporaryDirectory(prefix=f"compile_step_{setting}_") as cache:
        if not args.shared_cache:  # cold compilation caches: each setting pays its full compile time
            env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache) / "inductor")
            env["TRITON_CACHE_DIR"] = str(Path(cache) / "triton")
        start = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
            stdout, stderr, status = done.stdout, done.stderr, None if done.returncode == 0 else "failed"
        except subprocess.TimeoutExpired as expired:
            stdout, stderr, status = _text(expired.stdout), _text(expired.stderr), "timeout"
    rows = [json.loads(line[len(ROW_PREFIX) :]) for line in stdout.splitlines() if line.startswith(ROW_PREFIX)]
    row = rows[-1] if rows else {"setting": setting}
    row["elapsed_s"] = time.perf_counter() - start
    if status is not None:
        row["status"] = status
        row["error_tail"] = stderr[-2000:]
    return row


def _ratio(row: dict, eager: dict | None, key: str) -> str:
    value, base = row.get(key), (eager or {}).get(key)
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ({value / base:.2f}x)" if base else "")


def table(rows: list[dict]) -> str:
    eager = next((r for r in rows if r.get("setting") == "eager" and r.get("status") == "ok"), None)
    body = [
        [r["setting"], _ratio(r, eager, "first_s"), _ratio(r, eager, "second_length_s"), _ratio(r, eager, "steady_s"),
         r.get("compiles"), r.get("compiles_at_L2"), r.get("graph_breaks"), r.get("peak_GiB"),
         r.get("peak_GiB_first_steps"), r.get("elapsed_s"),
         r.get("status")]
        for r in rows
    ]  # fmt: skip
    headers = ["setting", "first step s (x eager)", "step at L2 s", "steady step s p50", "compiles",
               "compiles at L2", "graph breaks", "steady peak GiB", "first steps peak GiB", "elapsed s",
               "status"]  # fmt: skip
    return markdown_table(headers, body)


def main(argv=None) -> None:
    from trl_longctx.compile_regions import COMPILE_SETTINGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b", help="Preset of trl_longctx.memory.PRESETS.")
    parser.add_argument("--tiny", action="store_true", help="Tiny random Qwen3 on CPU (smoke test).")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=[EAGER, *COMPILE_SETTINGS])
    parser.add_argument("--lengths", type=int, nargs=2, default=[16384, 12288], metavar=("L", "L2"),
                        help="Completion length L of the first and steady steps, L2 of the recompilation step.")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="Steady-state steps at L (median reported).")
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--mlp-tiles", type=int, default=1, help="MLP tiles of the ours path (1: untiled).")
    parser.add_argument("--budget-s", type=float, default=540.0, help="Wall time for all settings together.")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="Wall time for one setting at most.")
    parser.add_argument("--shared-cache", action="store_true",
                        help="Share inductor/Triton caches between settings and runs (warm compiles).")  # fmt: skip
    parser.add_argument("--out", help="JSON output path (rewritten after every setting).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("compile_step.py needs CUDA (or --tiny on CPU).")
    env = environment(torch.device("cpu" if args.tiny else "cuda"), ("transformers", "peft", "trl"))
    env["shared_cache"] = args.shared_cache
    deadline, rows = time.perf_counter() + args.budget_s, []
    for setting in args.settings:
        remaining = deadline - time.perf_counter()
        if remaining < 30:
            rows.append({"setting": setting, "status": "skipped (budget)"})
            continue
        rows.append(run_setting(setting, args, min(args.timeout_s, remaining)))
        print(f"{setting}: {rows[-1].get('status')} in {rows[-1]['elapsed_s']:.0f} s", flush=True)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "error_tail"}), flush=True)
        if "error_tail" in rows[-1]:
            print(rows[-1]["error_tail"][-1000:], file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
