"""Where the peak of one GRPO step goes: allocated GiB after chosen decoder layers in forward and backward.

Runs `tools/bench/grpo_step.py`'s step (Qwen3-8B architecture, LoRA r=32, checkpointing) for one provider and length
and prints the allocated memory at layer boundaries, so a flat peak across offload on/off can be located.

Example:
    python tools/bench/grpo_step_memory_probe.py --length 16384 --provider ours
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step  # noqa: E402
from _common import GIB  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--providers", nargs="+", default=["ours", "ours-no-offload"])
    args = parser.parse_args()
    from trl_longctx.memory import CheckpointOffloader
    from trl_longctx.model_heads import decoder_and_lm_head

    model, shape = grpo_step.build_model("qwen3-8b", 32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    decoder, _ = decoder_and_lm_head(model)
    layers = decoder.layers
    marks: list[tuple[str, float, float]] = []

    def mark(name):
        torch.cuda.synchronize()
        marks.append((name, torch.cuda.memory_allocated() / GIB, torch.cuda.max_memory_allocated() / GIB))

    watched = {0, 1, len(layers) // 2, len(layers) - 2, len(layers) - 1}
    for index, layer in enumerate(layers):
        if index in watched:
            layer.register_forward_hook(lambda m, i, o, index=index: mark(f"fwd after layer {index}"))
            layer.register_full_backward_hook(lambda m, gi, go, index=index: mark(f"bwd after layer {index}"))
    for provider in args.providers:
        offloader = CheckpointOffloader() if provider == "ours" else None
        ids = torch.randint(0, shape.vocab_size, (2, 256 + args.length), device="cuda")
        step = grpo_step.make_step(provider, model, optimizer, ids, args.length, offloader)
        step()  # warm-up
        marks.clear()
        torch.cuda.reset_peak_memory_stats()
        mark("start")
        step()
        mark("end")
        print(f"== {provider} L={args.length}: name / allocated GiB / peak so far GiB")
        for name, allocated, peak in marks:
            print(f"{name:28s} {allocated:8.2f} {peak:8.2f}")
        del step, ids
        if offloader is not None:
            offloader.release()
        grpo_step.free_cuda()


if __name__ == "__main__":
    main()
