"""`longctx-grpo plan`: the predicted peak memory of one GRPO step by component, and the longest completion that fits.

    longctx-grpo plan --model qwen3-8b --gpu-memory-gib 80 --num-generations 2 --prompt-length 256 \
        --completion-length 32768 --mode lora

Plain argparse and the torch-free planner: bad values fail with a message naming the flag, in well under a second.
"""

from __future__ import annotations

import argparse

from .planner import GIB, LOGPROB_PATHS, MODES, TrainSetup, longest_completion, plan_memory
from .presets import PRESETS, load_model_shape


def make_plan_parser() -> argparse.ArgumentParser:
    """The argument parser of `longctx-grpo plan`."""
    parser = argparse.ArgumentParser(prog="longctx-grpo plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"Preset ({', '.join(sorted(PRESETS))}) or config.json path.")
    parser.add_argument("--gpu-memory-gib", type=float, required=True, help="Memory of one GPU, GiB.")
    parser.add_argument("--num-generations", type=int, default=2, help="Sequences per step on the GPU.")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--completion-length", type=int, default=32768)
    parser.add_argument("--mode", default="lora", help=f"One of {', '.join(MODES)}.")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--offload-checkpoints", choices=("on", "off"), default="on")
    parser.add_argument("--logprob-path", default="fused", help=f"One of {', '.join(LOGPROB_PATHS)}.")
    return parser


def _checked(args: argparse.Namespace) -> TrainSetup:
    """Turn parsed flags into a `TrainSetup`, re-raising errors under the flag's name."""
    if not args.gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib}.")
    flags = {
        "num_generations": args.num_generations,
        "prompt_length": args.prompt_length,
        "completion_length": args.completion_length,
        "lora_rank": args.lora_rank,
    }
    for name, value in flags.items():
        if value < (0 if name == "prompt_length" else 1):
            bound = ">= 0" if name == "prompt_length" else ">= 1"
            raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {value}.")
    if args.mode not in MODES:
        raise ValueError(f"--mode must be one of {list(MODES)}, got {args.mode!r}.")
    if args.logprob_path not in LOGPROB_PATHS:
        raise ValueError(f"--logprob-path must be one of {list(LOGPROB_PATHS)}, got {args.logprob_path!r}.")
    return TrainSetup(
        **flags,
        mode=args.mode,
        offload_checkpoints=args.offload_checkpoints == "on",
        logprob_path=args.logprob_path,
    )


def format_plan(model: str, setup: TrainSetup, gpu_memory_gib: float) -> str:
    """The table printed by `longctx-grpo plan`."""
    shape = load_model_shape(model)
    plan = plan_memory(shape, setup)
    lines = [
        f"model {model}, mode {setup.mode}, {setup.num_generations} x ({setup.prompt_length} prompt + "
        f"{setup.completion_length} completion) tokens, checkpoints offloaded: {setup.offload_checkpoints}, "
        f"log-probs: {setup.logprob_path}",
        "",
        "| component | GiB |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {gib:.2f} |" for name, gib in plan.rows_gib()]
    verdict = "fits" if plan.total <= gpu_memory_gib * GIB else "does NOT fit"
    longest = longest_completion(shape, setup, gpu_memory_gib)
    lines += [
        "",
        f"{setup.completion_length} completion tokens {verdict} in {gpu_memory_gib:g} GiB.",
        f"Longest completion that fits in {gpu_memory_gib:g} GiB: {longest} tokens.",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Run `longctx-grpo plan` (argv without the `plan` word); exits with a one-line message on a bad value."""
    args = make_plan_parser().parse_args(argv)
    try:
        setup = _checked(args)
        print(format_plan(args.model, setup, args.gpu_memory_gib))
    except ValueError as error:
        raise SystemExit(f"longctx-grpo plan: {error}") from None
