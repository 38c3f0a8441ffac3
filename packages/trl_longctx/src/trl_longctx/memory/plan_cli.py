"""`longctx-grpo plan`: the predicted peak memory of one GRPO step by component, and the longest completion that fits.

    longctx-grpo plan                                   # qwen3-8b and llama3.1-8b, ours vs TRL, on this machine's GPU
    longctx-grpo plan --gpu "H100 80GB" A100 --paths ours        # GPU presets; A100: both A100 presets
    longctx-grpo plan --model qwen3-8b --gpu-memory-gib 80 --completion-length 65536 --paths ours

Without `--gpu` or `--gpu-memory-gib` the GPU is this machine's, read with torch.cuda (every preset when there is no
CUDA GPU); the host memory the offloaded checkpoints may pin is this machine's less a reserve, unless
`--host-memory-gib` says. Plain argparse and the torch-free planner: `--help` and bad values answer before torch,
transformers, TRL or vLLM is imported, with a message naming the flag, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import math

from .capacity import rollout_capacity_problem, shares_weights_with_vllm, step_capacity
from .machine import GPUS_GIB, HOST_RESERVE_GIB, cuda_gpu, gpu_presets_matching, host_memory_gib, pinnable_host_gib
from .planner import (
    GIB,
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
# TRL's `ModelConfig.lora_dropout` default, which `longctx-grpo train` passes to PEFT unless the config sets it (a test
# checks it against TRL's; TRL is not imported here).
LORA_DROPOUT_DEFAULT = 0.05
# Paths that tile the MLPs when the untiled step does not fit (what `LongContextGRPOTrainer` does on CUDA).
TILING_PATHS = ("ours",)
# The label of `--gpu-memory-gib` in the printed plan.
GIVEN_GPU = "GPU"


def make_plan_parser() -> argparse.ArgumentParser:
    """The argument parser of `longctx-grpo plan`."""
    parser = argparse.ArgumentParser(prog="longctx-grpo plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS),
                        help=f"Presets ({', '.join(sorted(PRESETS))}) or config.json paths.")  # fmt: skip
    parser.add_argument(
        "--gpu",
        nargs="+",
        help=f"GPU presets, of {', '.join(repr(g) for g in GPUS_GIB)}, or card families (e.g. A100: each of its "
        "presets). Default: this machine's GPU (torch.cuda), or every preset without one.",
    )
    parser.add_argument("--gpu-memory-gib", type=float, help="Memory of one GPU, GiB (beside or instead of --gpu).")
    parser.add_argument(
        "--host-memory-gib",
        type=float,
        help=f"Host memory the offloaded checkpoints may pin, GiB (default: this machine's less "
        f"{HOST_RESERVE_GIB:g}).",
    )
    parser.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), help=f"Of {', '.join(PATHS)}.")
    parser.add_argument("--num-generations", type=int, default=2, help="Sequences per step on the GPU.")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--completion-length", type=int, default=32768)
    parser.add_argument("--mode", default="lora", help=f"One of {', '.join(MODES)}.")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=LORA_DROPOUT_DEFAULT,
        help=f"The adapters' dropout (lora_dropout); above 0 each adapter keeps its dropout mask (QLoRA: and output) "
        f"per layer. Default {LORA_DROPOUT_DEFAULT}: TRL's ModelConfig default, what `longctx-grpo train` uses unless "
        "the config sets lora_dropout.",
    )
    parser.add_argument(
        "--nf4-nested-scales",
        action="store_true",
        help="--mode qlora: the trainer's own 4-bit copy keeps bitsandbytes' nested block scales "
        "(use_bnb_nested_quant / bnb_4bit_use_double_quant; TRL's default is off). Weights shared with vLLM never do.",
    )
    parser.add_argument("--grpo-mini-batch", type=int, help="Sequences per decoder pass (default: all).")
    parser.add_argument(
        "--lora-experts",
        action="store_true",
        help="MoE models: adapters also on the expert weights (PEFT target_parameters on mlp.experts.gate_up_proj "
        "and mlp.experts.down_proj).",
    )
    parser.add_argument(
        "--vision-patches",
        type=int,
        default=0,
        help="Vision-language models: patches each sequence's images feed the vision tower (pixel_values rows; "
        "their image tokens, a quarter as many with a 2x2 merge, are part of --prompt-length). Default 0: no images.",
    )
    parser.add_argument(
        "--vision-trained",
        action="store_true",
        help="Vision-language models: the vision tower takes gradients (LoRA on it), so it keeps its activations for "
        "the backward.",
    )
    parser.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        help="Processes each sequence is split across (the trainer's sequence_parallel_size, DeepSpeed Ulysses; "
        "--paths ours only): each rank runs 1/N of every row of its group, planned as num-generations x N slices "
        "of 1/N of the tokens, one per decoder pass. Default 1: not split.",
    )
    parser.add_argument(
        "--router-aux-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="MoE models: the router aux loss is computed (TRL's default where the model config's "
        "router_aux_loss_coef is non-zero); --no-router-aux-loss for router_aux_loss_coef=0.",
    )
    return parser


def _checked(args: argparse.Namespace) -> dict:
    """The common `TrainSetup` keywords from parsed flags, every flag checked (models loaded); errors name the flag."""
    for model in args.model:
        shape = load_model_shape(model)
        if args.lora_experts and not shape.num_experts:
            raise ValueError(f"--lora-experts needs Mixture-of-Experts models, got {model!r} (no experts).")
        if (args.vision_patches or args.vision_trained) and shape.vision is None:
            raise ValueError(
                f"--vision-patches and --vision-trained need vision-language models (qwen3-vl-8b or a config.json "
                f"with a vision_config), got {model!r} (no vision tower)."
            )
    if args.sequence_parallel < 1:
        raise ValueError(f"--sequence-parallel must be >= 1, got {args.sequence_parallel}.")
    if args.sequence_parallel > 1 and args.paths != ["ours"]:
        raise ValueError(f"--sequence-parallel {args.sequence_parallel} plans our path only: use --paths ours, got "
                         f"{args.paths}.")  # fmt: skip
    if args.vision_patches < 0:
        raise ValueError(f"--vision-patches must be >= 0, got {args.vision_patches}.")
    if args.vision_trained and not args.vision_patches:
        raise ValueError("--vision-trained needs --vision-patches > 0 (a tower that sees no image keeps nothing).")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib}.")
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
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.lora_experts and args.mode == "full":
        raise ValueError("--lora-experts needs --mode lora or qlora (full fine-tuning has no adapters), got full.")
    if args.nf4_nested_scales and args.mode != "qlora":
        raise ValueError(f"--nf4-nested-scales needs --mode qlora (4-bit weights), got {args.mode}.")
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        raise ValueError(f"--paths must be among {list(PATHS)}, got {unknown}.")
    if args.grpo_mini_batch is not None and not 1 <= args.grpo_mini_batch <= args.num_generations:
        raise ValueError(f"--grpo-mini-batch must be in 1..--num-generations, got {args.grpo_mini_batch}.")
    return {**flags, "mode": args.mode, "grpo_mini_batch": args.grpo_mini_batch, "lora_experts": args.lora_experts,
            "router_aux_loss": args.router_aux_loss, "vision_patches": args.vision_patches,
            "vision_trained": args.vision_trained,
            "lora_dropout": args.lora_dropout > 0 and args.mode != "full",
            "nf4_nested_scales": args.nf4_nested_scales}  # fmt: skip


def named_gpus(names: list[str] | None, memory_gib: float | None) -> dict[str, float]:
    """The GPUs of `--gpu` (presets; a card family names each of its presets) and `--gpu-memory-gib`, in that order;
    empty when neither is given.

    Raises:
        ValueError: Naming `--gpu`, the value and the presets, for a name that matches none.
    """
    gpus = {}
    for name in names or ():
        matches = gpu_presets_matching(name)
        if not matches:
            raise ValueError(f"--gpu {name!r} is not a preset; allowed: {list(GPUS_GIB)}, or use --gpu-memory-gib.")
        gpus.update((preset, GPUS_GIB[preset]) for preset in matches)
    if memory_gib is not None:
        gpus[GIVEN_GPU] = memory_gib
    return gpus


def machine_gpus() -> tuple[dict[str, float], str]:
    """This machine's GPU (torch.cuda, when torch is installed and CUDA available), else every preset; and the plan
    header's words for them."""
    found = cuda_gpu()
    if found is None:
        return dict(GPUS_GIB), "every preset (no CUDA GPU here; choose with --gpu or --gpu-memory-gib)"
    name, gib = found
    return {name: gib}, f"{name} ({gib:g} GiB), this machine's, from torch.cuda"


def machine_host_gib() -> tuple[float | None, str]:
    """Host memory the offloaded checkpoints may pin on this machine (its memory less `HOST_RESERVE_GIB`, rounded down
    to 0.1 GiB; `None`, not limited, where the operating system does not say), and the header's words for it."""
    total = host_memory_gib()
    if total is None:
        return None, "not limited (this machine's memory is unknown; set --host-memory-gib)"
    pinnable = math.floor(pinnable_host_gib(total) * 10) / 10
    return pinnable, f"{pinnable:g} GiB (this machine's {total:.1f} GiB less {HOST_RESERVE_GIB:g})"


def format_plan(
    model: str,
    paths: list[str],
    setup_kwargs: dict,
    gpus: dict[str, float],
    host_gib: float | None = None,
    sequence_parallel: int = 1,
) -> str:
    """The table printed by `longctx-grpo plan` for one model: components by path, then the longest completions.

    `host_gib`: host memory the offloaded checkpoints may pin; `None` = not limited. `sequence_parallel`: processes
    each row is split across (`--sequence-parallel`; our path): one rank's share is planned, `num_generations x N`
    slices of `ceil(tokens / N)`, one per decoder pass, and the longest completions are of whole rows."""
    shape = load_model_shape(model)
    b, p, length = (setup_kwargs[k] for k in ("num_generations", "prompt_length", "completion_length"))
    sp = sequence_parallel
    per_rank = setup_kwargs
    title = f"model {model}, mode {setup_kwargs['mode']}, {b} x ({p} prompt + {length} completion) tokens; GiB"
    if sp > 1:
        per_rank = {**setup_kwargs, "num_generations": b * sp, "prompt_length": math.ceil(p / sp),
                    "completion_length": math.ceil(length / sp), "grpo_mini_batch": 1}  # fmt: skip
        title = (f"model {model}, mode {setup_kwargs['mode']}, {b} x ({p} prompt + {length} completion) tokens per "
                 f"rank, split over {sp} processes: each rank runs {b * sp} slices of ({per_rank['prompt_length']} + "
                 f"{per_rank['completion_length']}) tokens, one per decoder pass (Ulysses' all-to-all buffers not "
                 "counted); GiB")  # fmt: skip
    setups = {path: TrainSetup(**{**per_rank, **PATHS[path]}) for path in paths}
    plans = {path: plan_memory(shape, setup) for path, setup in setups.items()}
    names = list(dict.fromkeys(name for plan in plans.values() for name, _ in plan.rows_gib()))
    lines = [
        title,
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
            if host_gib is not None and pinned[path] > host_gib and verdict != "does NOT fit":
                # The GPU holds it, the host cannot pin the offloaded checkpoints: as `longest_completion` counts it.
                verdict = f"does NOT fit in host memory ({pinned[path]:.2f} GiB to pin, {host_gib:g} GiB allowed)"
            # Whole rows: a rank's slices are 1/N of them.
            longest = sp * longest_completion(shape, setups[path], gib, tile_mlps=tiling, host_memory_gib=host_gib)
            split = f" split over {sp} processes" if sp > 1 else ""
            lines.append(f"{gpu} ({gib:g} GiB), {PATH_LABELS[path]}{split}: {length} completion tokens {verdict}; "
                         f"longest completion that fits: {longest} tokens.")  # fmt: skip
    # Each rank's vLLM generates its own rows whole: the rollout is not split.
    lines += ["", _rollout_line(shape, b, p, length, setup_kwargs["mode"], gpus)]
    if setup_kwargs.get("nf4_nested_scales"):
        lines.append(
            "--nf4-nested-scales: the weights cannot be shared (vLLM keeps no nested scales), so vLLM's "
            f"{vllm_weight_bytes(shape, 'qlora') / GIB:.2f} GiB copy stays beside the trainer's while it trains, "
            "which the training plans above do not count."
        )
    if "ours" in setups and sp == 1:
        lines += ["", *_capacity_lines(shape, setups["ours"], gpus, host_gib)]
    return "\n".join(lines)


def _capacity_lines(shape: ModelShape, setup: TrainSetup, gpus: dict[str, float], host_gib: float | None) -> list[str]:
    """Per GPU, the most sequences of these lengths our path's step takes (`capacity.step_capacity`)."""
    lines = [f"Most sequences of {setup.prompt_length} + {setup.completion_length} tokens per step on one GPU, ours "
             "(training: per_device_train_batch_size; rollout: sequences vLLM decodes at once, "
             "per_device_train_batch_size x steps_per_generation, beyond which it decodes in waves):"]  # fmt: skip
    for gpu, gib in gpus.items():
        capacity = step_capacity(shape, setup, gib, host_memory_gib=host_gib)
        rollout = capacity.rollout if capacity.rollout is not None else f"not modeled ({capacity.rollout_note})"
        lines.append(f"{gpu} ({gib:g} GiB): training {capacity.training} (then {capacity.training_bound} runs out), "
                     f"rollout {rollout}.")  # fmt: skip
    return lines


def _rollout_line(shape: ModelShape, sequences: int, prompt: int, completion: int, mode: str, gpus: dict) -> str:
    """The colocated vLLM side (shared weights, KV standby): the rollout's KV cache and the utilization it needs."""
    if (problem := rollout_capacity_problem(shape, mode)) is not None:
        if shares_weights_with_vllm(shape, mode):
            return f"vLLM side: not modeled ({problem})."
        return (
            f"vLLM side: not modeled ({problem}). While the trainer trains, that copy (in bf16 "
            f"{vllm_weight_bytes(shape) / GIB:.2f} GiB; less where vLLM keeps a quantized checkpoint's weights) stays "
            "on the GPU beside what the training plans above count, unless TRL's sleep mode releases it "
            "(vllm_enable_sleep_mode=True, which reloads it for each rollout)."
        )
    tokens = rollout_kv_tokens(sequences, prompt, completion)
    need = ", ".join(
        f"{gpu} >= {min_vllm_utilization(shape, sequences, prompt, completion, gib, mode):.2f}"
        for gpu, gib in gpus.items()
    )
    copy = "one 4-bit copy of the weights" if mode == "qlora" else "one copy of the weights"
    return (
        f"vLLM side (colocated, {copy}: {vllm_weight_bytes(shape, mode) / GIB:.2f} GiB): the rollout of "
        f"{sequences} x ({prompt} + {completion}) tokens needs {tokens} KV tokens x {kv_bytes_per_token(shape)} B = "
        f"{tokens * kv_bytes_per_token(shape) / GIB:.2f} GiB; vllm_gpu_memory_utilization: {need}."
    )


def main(argv: list[str]) -> None:
    """Run `longctx-grpo plan` (argv without the `plan` word); exits with a one-line message on a bad value.

    Every flag is checked before this machine is asked anything (which may import torch)."""
    args = make_plan_parser().parse_args(argv)
    try:
        setup_kwargs = _checked(args)
        gpus = named_gpus(args.gpu, args.gpu_memory_gib)
        gpu = ", ".join(f"{name} ({gib:g} GiB)" for name, gib in gpus.items()) + " (as given)"
        if not gpus:
            gpus, gpu = machine_gpus()
        if args.host_memory_gib is None:
            host_gib, host = machine_host_gib()
        else:
            host_gib, host = args.host_memory_gib, f"{args.host_memory_gib:g} GiB (as given)"
        header = f"GPU: {gpu}.\nHost memory the offloaded checkpoints may pin: {host}."
        plans = [format_plan(model, args.paths, setup_kwargs, gpus, host_gib, args.sequence_parallel)
                 for model in args.model]  # fmt: skip
        print("\n\n".join([header, *plans]))
    except ValueError as error:
        raise SystemExit(f"longctx-grpo plan: {error}") from None
