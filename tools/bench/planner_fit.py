"""The memory planner against the measurements: predicted vs measured peaks, the fit of `ACTIVATION_SCALE`, the
predictions written before GPU runs.

The library's planner (`trl_longctx.memory`) holds the memory model and the search; this script holds what only
calibrates or checks it against `tools/bench/grpo_step.py`'s JSON files under `docs/bench/` and the peers' peaks of
`../shared/GPU.md`. Tested by `tests/test_planner_fit.py`.

    python tools/bench/planner_fit.py --compare-bench                        # every calibration file, then the peers
    python tools/bench/planner_fit.py --compare-bench docs/bench/grpo_step_h200_2026-11-22_32k.json
    python tools/bench/planner_fit.py --fit                                  # refit ACTIVATION_SCALE
    python tools/bench/planner_fit.py --write-predictions docs/bench/planner_predictions_2026-11-22.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from pathlib import Path

from trl_longctx.memory import PRESETS, ModelShape, TrainSetup, load_model_shape, plan_memory
from trl_longctx.memory.planner import ACTIVATION_SCALE, CUDA_CONTEXT_GIB, FRAGMENTATION, GIB, PATH_LABELS, PATHS
from trl_longctx.memory.rollout_kv import kv_bytes_per_token, utilization_kv_cache_bytes

REPO = Path(__file__).resolve().parents[2]
# Usable memory torch reported on the lent GPUs the measurements were taken on (../shared/GPU.md).
MEASURED_GPUS_GIB = {"H100 80GB": 79.2, "H200 141GB": 139.8}
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


def kv_tokens_at(shape: ModelShape, utilization: float, gpu_gib: float) -> int:
    """KV tokens vLLM gets at `utilization` of a `gpu_gib` GPU (with `VLLM_OTHER_GIB`: a lower bound), to check
    `trl_longctx.memory.rollout_kv` against the KV tokens measured engines reported."""
    return utilization_kv_cache_bytes(shape, utilization, gpu_gib * GIB) // kv_bytes_per_token(shape)


def calibration_points(root: Path | str = REPO) -> list[tuple[ModelShape, TrainSetup, float, bool]]:
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


def bench_rows(files: dict[str, tuple[str, ...]] | list[str], root: Path | str = REPO) -> list[dict]:
    """Predicted vs measured peaks of `tools/bench/grpo_step.py` JSON files (rows with status "ok").

    Args:
        files: Paths, or paths mapped to the providers to keep (`BENCH_FILES`).
        root: Directory the relative paths are relative to (absolute paths stay as they are).

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
    """A markdown table of `bench_rows` or `peer_rows`."""
    lines = ["| provider | model | L | measured GiB | predicted GiB | error | |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = "held out" if r.get("held_out") else r.get("gpu", "")
        lines.append(f"| {r['provider']} | {r.get('model', 'qwen3-8b')} | {r['L']} | {r['measured_GiB']:.2f} | "
                     f"{r['predicted_GiB']:.2f} | {r['error_pct']:+.1f}% | {note} |")  # fmt: skip
    return "\n".join(lines)


def predictions(runs=NEXT_RUNS, num_generations: int = 2, prompt_length: int = 256, lora_rank: int = 32) -> dict:
    """The planner's predictions for `runs` (model, path, completion length) on the H200, as a JSON-ready dict."""
    gib = MEASURED_GPUS_GIB["H200 141GB"]
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
        "device": f"NVIDIA H200 ({gib} GiB usable)",
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


def format_fit(root: Path | str = REPO) -> str:
    """The refitted `ACTIVATION_SCALE` against the one in the planner, and the errors of the held-out rows."""
    points = calibration_points(root)
    fitted = fit_activation_scale([(shape, setup, measured) for shape, setup, measured, held in points if not held])
    held_out = [r for r in bench_rows(BENCH_FILES, root) if r["held_out"]]
    return (
        f"fitted ACTIVATION_SCALE {fitted:.4f} on {len(points) - len(held_out)} rows (the planner's: "
        f"{ACTIVATION_SCALE}); held-out rows:\n{format_errors(held_out)}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--compare-bench", nargs="*", metavar="JSON",
                      help="Print predicted vs measured rows of these files (default: every calibration file, then "
                      "the peers).")  # fmt: skip
    what.add_argument("--fit", action="store_true", help="Refit ACTIVATION_SCALE and print the held-out errors.")
    what.add_argument("--write-predictions", metavar="JSON", help="Write the predictions of the next GPU runs.")
    args = parser.parse_args(argv)
    if args.compare_bench is not None:
        if args.compare_bench:
            print(format_errors(bench_rows(args.compare_bench, Path.cwd())))
        else:
            print(format_errors(bench_rows(BENCH_FILES)) + "\n\n" + format_errors(peer_rows()))
    elif args.fit:
        print(format_fit())
    else:
        Path(args.write_predictions).write_text(json.dumps(predictions(), indent=1) + "\n")
        print(f"wrote {args.write_predictions}")


if __name__ == "__main__":
    main()
