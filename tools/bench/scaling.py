"""Long-context policy steps on one or several GPUs through Accelerate: step time, memory per GPU, scaling.

Run under `accelerate launch` with one of `configs/accelerate/*.yaml`; each rank holds `--num-generations`
sequences of `--prompt-length + --length` random tokens (global batch = that x processes). One step is what
`LongContextGRPOTrainer` runs for the loss: the decoder called through the wrapped model (forward redirection, so
DDP's gradient sync and FSDP2's gathers fire), checkpointed layer inputs offloaded, the lm_head gathered where it is
sharded, `longctx_kernels.selective_logprobs`, TRL's GRPO loss with `num_iterations=1`, backward and an AdamW step of
the LoRA parameters. Rank 0 prints one JSON row: median seconds per step, tokens per second over all ranks, peak
allocated GiB per GPU (max over ranks).

Example (2 GPUs, DDP, then FSDP2; and the 1-GPU baseline):
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 tools/bench/scaling.py
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 tools/bench/scaling.py
    accelerate launch --config_file configs/accelerate/single_gpu.yaml tools/bench/scaling.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB  # noqa: E402
from grpo_step import build_model  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-1.7b")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps, after one warm-up step.")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from longctx_kernels import selective_logprobs
    from trl_longctx.distributed import ForwardRedirection, full_tensor
    from trl_longctx.memory import CheckpointOffloader
    from trl_longctx.model_heads import decoder_and_lm_head

    accelerator = Accelerator()
    if accelerator.device.index is not None:
        torch.cuda.set_device(accelerator.device)
    model, shape = build_model(args.model, lora_rank=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    offloader, redirection = CheckpointOffloader(), ForwardRedirection()
    keep = args.length

    def logps(unwrapped, ids):
        decoder, lm_head = decoder_and_lm_head(unwrapped)
        with offloader.offload(unwrapped):
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        weight = full_tensor(lm_head.weight)
        return selective_logprobs(hidden[:, -keep - 1 : -1].to(weight.dtype), weight, ids[:, -keep:])

    generator = torch.Generator(device="cuda").manual_seed(accelerator.process_index)
    ids = torch.randint(
        0, shape.vocab_size, (args.num_generations, args.prompt_length + keep), device="cuda", generator=generator
    )
    advantages = torch.randn(args.num_generations, 1, device="cuda", generator=generator)

    def step():
        unwrapped = accelerator.unwrap_model(model)
        with accelerator.autocast():
            if redirection.needed(model, unwrapped):
                out = redirection(model, unwrapped, logps, unwrapped, ids)
            else:
                out = logps(unwrapped, ids)
        loss = -(torch.exp(out - out.detach()) * advantages).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps):
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / GIB], device="cuda")
    peak = accelerator.gather(peak).max().item()
    median = statistics.median(seconds)
    if accelerator.is_main_process:
        tokens = accelerator.num_processes * args.num_generations * (args.prompt_length + keep)
        print(json.dumps({
            "model": args.model, "L": keep, "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "s_per_step": median, "s_all": seconds,
            "tokens_per_s": tokens / median, "peak_GiB_per_gpu": peak, "device": torch.cuda.get_device_name(),
        }), flush=True)  # fmt: skip
    offloader.release()
    accelerator.end_training()


if __name__ == "__main__":
    main()
