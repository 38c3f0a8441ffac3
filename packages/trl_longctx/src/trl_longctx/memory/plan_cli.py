"""`longctx-grpo plan`: the predicted peak memory of one GRPO step by component, and the longest completion that fits.

    longctx-grpo plan                                   # qwen3-8b and llama3.1-8b, ours vs TRL, on H100 and H200
    longctx-grpo plan --model qwen3-8b --gpu-memory-gib 80 --completion-length 65536 --paths ours
    longctx-grpo plan --compare-bench docs/bench/grpo_step_h200_2026-11-22_32k.json   # predicted vs measured
    longctx-grpo plan --write-predictions docs/bench/planner_predictions_2026-11-22.json

Plain argparse and the torch-free planner: bad values fail with a message naming the flag, in well under a second.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from pathlib import Path

from .planner import (
    ACTIVATION_SCALE,
    CUDA_CONTEXT_GIB,
    FRAGMENTATION,
    GIB,
    GPUS_GIB,
    MODES,
    PATH_LABELS,
    PATHS,
    ModelShape,
    TrainSetup,
    fewest_mlp_tiles,
    longest_completion,
    pinned_host_bytes,
    plan_memory,
)
from .presets import PRESETS, load_model_shape
from .rollout_kv import kv_bytes_per_token, min_vllm_utilization, rollout_kv_tokens, vllm_weight_bytes

DEFAULT_MODELS = ("qwen3-8b", "llama3.1-8b")
DEFAULT_PATHS = ("ours", "trl")
# Host RAM of the lent GPU machines (../shared/GPU.md, `free -g`): what the offloaded checkpoints can pin, less room
# for the process itself.
HOST_GIB = {"H100 80GB": 125.0, "H200 141GB": 125.0}
HOST_RESERVE_GIB = 16.0
# Paths that tile the MLPs when the untiled step does not fit (what `LongContextGRPOTrainer` does on CUDA).
TILING_PATHS = ("ours",)
# Measured rows of `tools/bench/grpo_step.py` on the lent H200 (paths relative to the repository root) and which
# providers of each file count: the first run's `ours` rows were taken with the offloader bug that kept every layer
# input on the GPU (docs/benchmarks.md), its `trl` and `ours-no-offload` rows are valid.
BENCH_FILES = {
    "docs/bench/grpo_step_h200_2026-11-22_32k.json": ("ours", "trl", "ours-no-offload"),
    "docs/bench/grpo_step_h200_2026-11-22_98k.json": ("ours",),
    "docs/bench/grpo_step_h200_2026-11-22_160k.json": ("ours",),
    "docs/bench/superseded/grpo_step_h200_2026-11-22_a.json": ("trl", "ours-no-offload"),
}
# `grpo_step.py`'s default prompt length; its JSON does not record it.
BENCH_PROMPT_LENGTH = 256
# Kept out of `fit_activation_scale`: the longest `ours` step (extrapolation) and TRL's shortest.
HELD_OUT = {("ours", 163840), ("trl", 4096)}
# Peers measured by another script on the lent GPUs (../shared/GPU.md; Qwen3-8B, LoRA r=32, 2 x (256 + L)); never
# fitted. "TRL default (logits)" materializes the logits (TRL before 1.16): the `materialized` path. TRL + Liger's
# GRPO loss is not modeled; its rows are listed against the `trl` path for reference only.
PEER_PEAKS_GIB = [
    ("materialized", "H200 141GB", 4096, 27.5),
    ("materialized", "H200 141GB", 16384, 62.4),
    ("materialized", "H200 141GB", 32768, 109.0),
    ("materialized", "H100 80GB", 16384, 62.4),
    ("trl+liger (not modeled)", "H200 141GB", 4096, 21.3),
    ("trl+liger (not modeled)", "H200 141GB", 16384, 37.1),
    ("trl+liger (not modeled)", "H200 141GB", 32768, 58.1),
    ("trl+liger (not modeled)", "H200 141GB", 49152, 79.1),
    ("trl+liger (not modeled)", "H200 141GB", 81920, 121.2),
]
# The GPU runs planned after this planner (2 generations, prompt 256, LoRA r=32 on all linear layers, H200).
NEXT_RUNS = [
    ("qwen3-8b", "ours", 16384),
    ("qwen3-8b", "ours", 65536),
    ("qwen3-8b", "ours", 131072),
    ("llama3.1-8b", "ours", 32768),
    ("llama3.1-8b", "ours", 98304),
    ("qwen3-8b", "trl", 16384),
    ("llama3.1-8b", "trl", 16384),
]


def bench_shape(model: str) -> ModelShape:
    """The model `tools/bench/grpo_step.py` builds for a preset: Qwen3 layers (q/k norms) with the preset's sizes."""
    shape = load_model_shape(model)
    return ModelShape(**{**shape.__dict__, "qk_norm": True})


def bench_setup(row: dict) -> TrainSetup:
    """The `TrainSetup` of one row of `tools/bench/grpo_step.py` (rows before MLP tiling and QLoRA lack the keys)."""
    return TrainSetup.for_path(
        row["provider"], row["B"], row.get("prompt_length", BENCH_PROMPT_LENGTH), row["L"],
        mode=row.get("mode", "lora"), tiled_mlp_chunks=row.get("mlp_tiles", 1), grpo_mini_batch=row.get("mini_batch"),
    )  # fmt: skip


def make_plan_parser() -> argparse.ArgumentParser:
    """The argument parser of `longctx-grpo plan`."""
    parser = argparse.ArgumentParser(prog="longctx-grpo plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS),
                        help=f"Presets ({', '.join(sorted(PRESETS))}) or config.json paths.")  # fmt: skip
    parser.add_argument("--gpu", nargs="+", default=list(GPUS_GIB), help=f"GPUs, of {', '.join(GPUS_GIB)}.")
    parser.add_argument("--gpu-memory-gib", type=float, help="Memory of one GPU, GiB (instead of --gpu).")
    parser.add_argument(
        "--host-memory-gib",
        type=float,
        help="Host memory the offloaded checkpoints may pin, GiB (default: the lent machines' less 16).",
    )
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), help=f"Of {', '.join(PATHS)}.")
    parser.add_argument("--num-generations", type=int, default=2, help="Sequences per step on the GPU.")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--completion-length", type=int, default=32768)
    parser.add_argument("--mode", default="lora", help=f"One of {', '.join(MODES)}.")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--grpo-mini-batch", type=int, help="Sequences per decoder pass (default: all).")
    parser.add_argument("--compare-bench", nargs="+", metavar="JSON", help="Print predicted vs measured rows.")
    parser.add_argument("--write-predictions", metavar="JSON", help="Write the predictions of the next GPU runs.")
    return parser


def _checked(args: argparse.Namespace) -> tuple[dict[str, float], dict]:
    """The GPUs and the common `TrainSetup` keywords from parsed flags; errors name the flag."""
    unknown = [g for g in args.gpu if g not in GPUS_GIB]
    if unknown:
        raise ValueError(f"--gpu must be among {list(GPUS_GIB)}, got {unknown}.")
    gpus = {g: GPUS_GIB[g] for g in args.gpu}
    if args.gpu_memory_gib is not None:
        if not args.gpu_memory_gib > 0:
            raise ValueError(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib}.")
        gpus = {"GPU": args.gpu_memory_gib}
    if args.host_memory_gib is not None and not args.host_memory_gib > 0:
        raise ValueError(f"--host-memory-gib must be > 0, got {args.host_memory_gib}.")
    flags = {"num_generations": args.num_generations, "prompt_length": args.prompt_length,
             "completion_length": args.completion_length, "lora_rank": args.lora_rank}  # fmt: skip
    for name, value in flags.items():
        if value < (0 if name == "prompt_length" else 1):
            bound = ">= 0" if name == "prompt_length" else ">= 1"
            raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {value}.")
    if args.mode not in MODES:
        raise ValueError(f"--mode must be one of {list(MODES)}, got {args.mode!r}.")
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        raise ValueError(f"--paths must be among {list(PATHS)}, got {unknown}.")
    if args.grpo_mini_batch is not None and not 1 <= args.grpo_mini_batch <= args.num_generations:
        raise ValueError(f"--grpo-mini-batch must be in 1..--num-generations, got {args.grpo_mini_batch}.")
    return gpus, {**flags, "mode": args.mode, "grpo_mini_batch": args.grpo_mini_batch}


def format_plan(
    model: str, paths: list[str], setup_kwargs: dict, gpus: dict[str, float], host_gib: float | None = None
) -> str:
    """The table printed by `longctx-grpo plan` for one model: components by path, then the longest completions.

    `host_gib`: host memory the offloaded checkpoints may pin; `None` = the lent machine's (`HOST_GIB`) less
    `HOST_RESERVE_GIB` for a known GPU, unlimited for `--gpu-memory-gib`."""
    shape = load_model_shape(model)
    b, p, length = (setup_kwargs[k] for k in ("num_generations", "prompt_length", "completion_length"))
    setups = {path: TrainSetup(**{**setup_kwargs, **PATHS[path]}) for path in paths}
    plans = {path: plan_memory(shape, setup) for path, setup in setups.items()}
    names = list(dict.fromkeys(name for plan in plans.values() for name, _ in plan.rows_gib()))
    lines = [
        f"model {model}, mode {setup_kwargs['mode']}, {b} x ({p} prompt + {length} completion) tokens; GiB",
        "",
        "| component | " + " | ".join(PATH_LABELS[path] for path in paths) + " |",
        "|---" * (len(paths) + 1) + "|",
    ]
    for name in names:
        cells = [dict(plan.rows_gib()).get(name) for plan in plans.values()]
        lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines.append("| peak is in | " + " | ".join(plan.phase for plan in plans.values()) + " |")
    pinned = {path: pinned_host_bytes(shape, setup) / GIB for path, setup in setups.items()}
    lines.append("| pinned host memory (offloaded inputs) | " + " | ".join(f"{h:.2f}" for h in pinned.values()) + " |")
    lines.append("")
    for gpu, gib in gpus.items():
        for path in paths:
            # Our trainer tiles the MLPs on CUDA when the untiled step does not fit (`tiled_mlp_chunks=None`).
            tiling = path in TILING_PATHS
            tiles = fewest_mlp_tiles(shape, setups[path], gib * GIB) if tiling else None
            verdict = "fits" if plans[path].total <= gib * GIB else "does NOT fit"
            if tiles is not None and tiles > 1:
                verdict = f"fits with {tiles} MLP tiles"
            host = host_gib if host_gib is not None else HOST_GIB.get(gpu)
            host = None if host is None else host - (HOST_RESERVE_GIB if host_gib is None else 0)
            if host is not None and pinned[path] > host and verdict != "does NOT fit":
                # The GPU holds it, the host cannot pin the offloaded checkpoints: as `longest_completion` counts it.
                verdict = f"does NOT fit in host memory ({pinned[path]:.2f} GiB to pin, {host:g} GiB allowed)"
            longest = longest_completion(shape, setups[path], gib, tile_mlps=tiling, host_memory_gib=host)
            lines.append(f"{gpu} ({gib:g} GiB), {PATH_LABELS[path]}: {length} completion tokens {verdict}; "
                         f"longest completion that fits: {longest} tokens.")  # fmt: skip
    lines += ["", _rollout_line(shape, b, p, length, setup_kwargs["mode"], gpus)]
    return "\n".join(lines)


def _rollout_line(shape: ModelShape, sequences: int, prompt: int, completion: int, mode: str, gpus: dict) -> str:
    """The colocated vLLM side (shared weights, KV standby): the rollout's KV cache and the utilization it needs."""
    if mode == "qlora":
        return "vLLM side: not modeled for 4-bit weights (QLoRA)."
    tokens = rollout_kv_tokens(sequences, prompt, completion)
    need = ", ".join(
        f"{gpu} >= {min_vllm_utilization(shape, sequences, prompt, completion, gib):.2f}" for gpu, gib in gpus.items()
    )
    return (
        f"vLLM side (colocated, one copy of the weights: {vllm_weight_bytes(shape) / GIB:.2f} GiB): the rollout of "
        f"{sequences} x ({prompt} + {completion}) tokens needs {tokens} KV tokens x {kv_bytes_per_token(shape)} B = "
        f"{tokens * kv_bytes_per_token(shape) / GIB:.2f} GiB; vllm_gpu_memory_utilization: {need}."
    )


def calibration_points(root: Path | str = ".") -> list[tuple[ModelShape, TrainSetup, float, bool]]:
    """`(shape, setup, measured bytes, held out)` of every measured row of `BENCH_FILES`."""
    points = []
    for name, providers in BENCH_FILES.items():
        data = json.loads((Path(root) / name).read_text())
        for row in data["rows"]:
            if row.get("status") == "ok" and row["provider"] in providers:
                setup = bench_setup(row)
                held_out = (row["provider"], row["L"]) in HELD_OUT
                points.append((bench_shape(row["model"]), setup, row["GiB"] * GIB, held_out))
    return points


def fit_activation_scale(
    points: list[tuple[ModelShape, TrainSetup, float]], low: float = 0.5, high: float = 1.5
) -> float:
    """The `activation_scale` minimizing the sum of squared relative errors against measured peaks.

    Args:
        points: `(shape, setup, measured max_memory_allocated bytes)` triples (never the held-out ones).
        low, high: Bracket searched (golden section; the error is unimodal in the scale).

    Returns:
        The fitted factor, to 1e-6.
    """

    def loss(scale: float) -> float:
        return sum((plan_memory(s, t, activation_scale=scale).allocated / m - 1) ** 2 for s, t, m in points)

    ratio = (math.sqrt(5) - 1) / 2
    while high - low > 1e-6:
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if loss(a) <= loss(b) else (a, high)
    return (low + high) / 2


def bench_rows(files: dict[str, tuple[str, ...]] | list[str], root: Path | str = ".") -> list[dict]:
    """Predicted vs measured peaks of `tools/bench/grpo_step.py` JSON files (rows with status "ok").

    Args:
        files: Paths, or paths mapped to the providers to keep (`BENCH_FILES`).
        root: Directory the paths are relative to.

    Returns:
        One dict per row: provider, model, L, B, measured and predicted GiB, error in percent, file, held_out.
    """
    if not isinstance(files, dict):
        files = dict.fromkeys(files, tuple(PATHS))
    rows = []
    for name, providers in files.items():
        data = json.loads((Path(root) / name).read_text())
        for row in data["rows"]:
            if row.get("status") != "ok" or row["provider"] not in providers:
                continue
            setup = bench_setup(row)
            predicted = plan_memory(bench_shape(row["model"]), setup).allocated / GIB
            rows.append({"provider": row["provider"], "model": row["model"], "L": row["L"], "B": row["B"],
                         "measured_GiB": row["GiB"], "predicted_GiB": predicted,
                         "error_pct": (predicted / row["GiB"] - 1) * 100, "file": name,
                         "held_out": (row["provider"], row["L"]) in HELD_OUT})  # fmt: skip
    return rows


def peer_rows() -> list[dict]:
    """Predicted vs the peer peaks of `PEER_PEAKS_GIB` (Qwen3-8B; reference, never fitted)."""
    rows = []
    for provider, gpu, length, gib in PEER_PEAKS_GIB:
        path = provider if provider in PATHS else "trl"
        predicted = plan_memory(PRESETS["qwen3-8b"], TrainSetup.for_path(path, 2, 256, length)).allocated / GIB
        rows.append({"provider": provider, "gpu": gpu, "L": length, "measured_GiB": gib, "predicted_GiB": predicted,
                     "error_pct": (predicted / gib - 1) * 100})  # fmt: skip
    return rows


def format_errors(rows: list[dict]) -> str:
    lines = ["| provider | model | L | measured GiB | predicted GiB | error | |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = "held out" if r.get("held_out") else r.get("gpu", "")
        lines.append(f"| {r['provider']} | {r.get('model', 'qwen3-8b')} | {r['L']} | {r['measured_GiB']:.2f} | "
                     f"{r['predicted_GiB']:.2f} | {r['error_pct']:+.1f}% | {note} |")  # fmt: skip
    return "\n".join(lines)


def predictions(runs=NEXT_RUNS, num_generations: int = 2, prompt_length: int = 256, lora_rank: int = 32) -> dict:
    """The planner's predictions for `runs` (model, path, completion length) on the H200, as a JSON-ready dict."""
    gib = GPUS_GIB["H200 141GB"]
    rows = []
    for model, path, length in runs:
        setup = TrainSetup.for_path(path, num_generations, prompt_length, length, lora_rank=lora_rank)
        plan = plan_memory(bench_shape(model), setup)
        row = {"model": model, "path": path, "label": PATH_LABELS[path], "L": length,
               "predicted_allocated_GiB": round(plan.allocated / GIB, 2),
               "predicted_total_GiB": round(plan.total / GIB, 2), "fits_H200": plan.total <= gib * GIB,
               "peak_phase": plan.phase,
               "components_GiB": {k: round(v / GIB, 3) for k, v in plan.components.items()}}  # fmt: skip
        if not load_model_shape(model).qk_norm:
            exact = plan_memory(load_model_shape(model), setup)
            row["predicted_allocated_GiB_without_qk_norm"] = round(exact.allocated / GIB, 2)
        rows.append(row)
    return {
        "date": _dt.date.today().isoformat(),
        "device": "NVIDIA H200 (139.8 GiB usable)",
        "setup": f"{num_generations} generations, prompt {prompt_length}, LoRA r={lora_rank} on all linear layers, "
        "gradient checkpointing (non-reentrant), SDPA, bf16 autocast, as tools/bench/grpo_step.py runs it (no MLP "
        "tiling, grpo_mini_batch = all sequences)",
        "compare_with": "torch.cuda.max_memory_allocated of the timed step (the GiB column of grpo_step.py); "
        "planner target: within 10%",
        "model_note": "predicted_allocated_GiB is for the model grpo_step.py builds: Qwen3 layers (q/k norms) with the "
        "preset's sizes, also for llama3.1-8b; predicted_allocated_GiB_without_qk_norm is a real Llama-3.1-8B",
        "planner": {
            "ACTIVATION_SCALE": ACTIVATION_SCALE,
            "FRAGMENTATION": FRAGMENTATION,
            "CUDA_CONTEXT_GIB": CUDA_CONTEXT_GIB,
        },
        "runs": rows,
    }


def main(argv: list[str]) -> None:
    """Run `longctx-grpo plan` (argv without the `plan` word); exits with a one-line message on a bad value."""
    args = make_plan_parser().parse_args(argv)
    try:
        if args.compare_bench:
            print(format_errors(bench_rows(args.compare_bench)))
            return
        if args.write_predictions:
            Path(args.write_predictions).write_text(json.dumps(predictions(), indent=1) + "\n")
            print(f"wrote {args.write_predictions}")
            return
        gpus, setup_kwargs = _checked(args)
        print(
            "\n\n".join(
                format_plan(model, args.paths, setup_kwargs, gpus, args.host_memory_gib) for model in args.model
            )
        )
    except ValueError as error:
        raise SystemExit(f"longctx-grpo plan: {error}") from None
