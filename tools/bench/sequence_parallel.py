"""The longest sequence one training pass takes with sequence parallelism (DeepSpeed Ulysses) on N GPUs, against one.

Each rank holds `--rows` rows of `--prompt-length + L` random tokens. One training pass is what
`LongContextGRPOTrainer` runs with `sequence_parallel_size` = `--sp`: `trl_longctx.sequence_parallel.UlyssesLogProbs`
over groups of `--sp` consecutive ranks (`--sp 1`: the plain pass, no Ulysses), checkpointed layer inputs offloaded
(`CheckpointOffloader`), the fused log-probs, a GRPO-like loss of the completion's log-probs, backward and an AdamW
step of the LoRA parameters (the model's gradients averaged over the ranks, as DDP does). Rank 0 prints one JSON row:
median seconds per pass, tokens per second over all ranks, peak allocated GiB per GPU (max over ranks).

`longest` runs one `torchrun` per length of `--lengths` (ascending), each in its own processes with a time limit, so
that an out-of-memory rank, which leaves the others waiting in a collective, costs its length only; it stops at the
first length that fails and reports the longest that ran.

Without CUDA (`--model tiny`): a tiny Qwen3 on gloo, to check the script end to end; its numbers mean nothing.
Checked so on CPU, 2026-12-06: 2 processes with `--sp 2` and 1 with `--sp 1` ran their lengths.

Example (one node of 8 GPUs: 8-way sequence parallel, then one GPU):
    python tools/bench/sequence_parallel.py longest --processes 8 --sp 8 --model qwen3-8b \
        --lengths 65536 131072 262144 524288 --out docs/bench/sp_qwen3_8b_8gpu.json
    python tools/bench/sequence_parallel.py longest --processes 1 --sp 1 --model qwen3-8b --lengths 65536 131072
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, environment  # noqa: E402


def build(model: str, lora_rank: int):
    """The model (LoRA on every linear layer, checkpointing on) and its vocabulary size, on this rank's device."""
    if model != "tiny":
        from grpo_step import build_model

        peft_model, shape = build_model(model, lora_rank=lora_rank)
        return peft_model, shape.vocab_size
    from peft import LoraConfig, get_peft_model

    from trl_longctx.tiny_models import build_tiny_qwen3

    base = build_tiny_qwen3(64, num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    base.config._attn_implementation = "sdpa"
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(base, LoraConfig(r=lora_rank, target_modules="all-linear"))
    peft_model.enable_input_require_grads()
    return peft_model, 64


def cmd_run(args) -> None:
    """One length, in the processes torchrun started (module docstring)."""
    import torch.distributed as dist

    from trl_longctx.memory import CheckpointOffloader
    from trl_longctx.model_heads import decoder_and_lm_head
    from trl_longctx.sequence_parallel import UlyssesLogProbs, sequence_parallel_group

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    model, vocab = build(args.model, args.lora_rank)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    decoder, lm_head = decoder_and_lm_head(model)
    head = (lm_head.weight, lm_head.bias)
    offloader = CheckpointOffloader()
    ulysses = UlyssesLogProbs(model, sequence_parallel_group(args.sp)) if args.sp > 1 else None
    generator = torch.Generator().manual_seed(rank)
    keep = args.length
    ids = torch.randint(3, vocab, (args.rows, args.prompt_length + keep), generator=generator).to(device)
    mask = torch.ones_like(ids)
    advantages = torch.randn(args.rows, 1, generator=generator).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None

    def logps():
        if ulysses is not None:
            values, _ = ulysses(decoder, head, ids, mask, keep, autocast=autocast,
                                decoder_context=lambda: offloader.offload(model))  # fmt: skip
            return values
        from longctx_kernels import selective_logprobs

        with offloader.offload(model), autocast() if autocast else contextlib.nullcontext():
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        return selective_logprobs(hidden[:, -keep - 1 : -1].to(head[0].dtype), head[0], ids[:, -keep:])

    def step():
        with ulysses if ulysses is not None else contextlib.nullcontext():
            out = logps()
            loss = -(torch.exp(out - out.detach()) * advantages).mean()
            loss.backward()
        for parameter in trained:  # the average over the ranks, as DDP takes it
            dist.all_reduce(parameter.grad)
            parameter.grad /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (kernels compiled, pinned buffers sized)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        sync()
        seconds.append(time.perf_counter() - start)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / GIB if cuda else 0.0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    median = statistics.median(seconds)
    if rank == 0:
        tokens = world * args.rows * (args.prompt_length + keep)
        print(json.dumps({
            "model": args.model, "L": keep, "processes": world, "sp": args.sp, "rows_per_rank": args.rows,
            "s_per_pass": median, "s_all": seconds, "tokens_per_s": tokens / median,
            "peak_GiB_per_gpu": peak.item() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        }), flush=True)  # fmt: skip
    offloader.release()
    if ulysses is not None:
        from trl_longctx.sequence_parallel import leave_process_group

        leave_process_group()
    else:
        dist.barrier()
        dist.destroy_process_group()


def cmd_longest(args) -> None:
    """One torchrun per length, ascending, until one fails; the rows and the longest length that ran."""
    rows, longest = [], None
    for length in sorted(args.lengths):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                   "--master_port", str(29700 + length % 97), str(Path(__file__).resolve()), "run",
                   "--model", args.model, "--sp", str(args.sp), "--length", str(length), "--rows", str(args.rows),
                   "--prompt-length", str(args.prompt_length), "--steps", str(args.steps),
                   "--lora-rank", str(args.lora_rank)]  # fmt: skip
        print("$", " ".join(command[3:]), flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"model"')]
            row = found[-1] if done.returncode == 0 and found else {
                "L": length, "status": f"exit {done.returncode}", "stderr": done.stderr[-2000:]}  # fmt: skip
        except subprocess.TimeoutExpired:
            row = {"L": length, "status": f"timeout after {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if "status" in row:
            break
        longest = length
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"environment": environment(device, ("deepspeed",)), "processes": args.processes, "sp": args.sp,
              "model": args.model, "longest_L": longest, "rows": rows}  # fmt: skip
    print(json.dumps({"longest_L": longest, "processes": args.processes, "sp": args.sp}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "longest"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="qwen3-8b", help="A trl_longctx.memory.PRESETS name, or tiny (CPU).")
        p.add_argument("--sp", type=int, default=2, help="Sequence-parallel group size (1: no Ulysses).")
        p.add_argument("--rows", type=int, default=1, help="Rows per rank.")
        p.add_argument("--prompt-length", type=int, default=256)
        p.add_argument("--steps", type=int, default=2, help="Timed passes after one warm-up pass.")
        p.add_argument("--lora-rank", type=int, default=32)
        if name == "run":
            p.add_argument("--length", type=int, required=True, help="Completion tokens per row.")
        else:
            p.add_argument("--processes", type=int, required=True)
            p.add_argument("--lengths", type=int, nargs="+", required=True)
            p.add_argument("--timeout", type=float, default=900, help="Seconds per length.")
            p.add_argument("--out")
    args = parser.parse_args(argv)
    (cmd_run if args.cmd == "run" else cmd_longest)(args)


if __name__ == "__main__":
    main()
