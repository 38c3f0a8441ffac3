"""Memory timeline of one GRPO training step by component, TRL's default path ("before") against ours ("after").

The step is `tools/bench/grpo_step.py`'s (same model: Qwen3-8B architecture with random bf16 weights, LoRA r=32 on
all linear layers, gradient checkpointing, 2 generations, prompt 256, completion `--length`): `trl` runs TRL 1.16's
`fused_lm_head` path, `ours` the decoder under `CheckpointOffloader` (with the planner's mini batch and MLP tiles)
then `selective_logprobs`. Each provider runs one warm-up step, then one step recorded by
`step_timeline.record_step` (beside this script) with phase markers at the forward, the log-probs (after the final
norm), the backward and the optimizer step. Writes `docs/bench/step_memory_timeline_<tag>.json` (series, peaks by
component, environment) and `docs/step_memory_timeline_<tag>.png`.

Example (on the GPU, TRL 1.16 on the path):
    python tools/bench/step_memory_timeline.py --length 32768 --tag h200_2026-11-22
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, free_cuda, is_oom  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LABELS = {"trl": "before: TRL 1.16 default path", "ours": "after: ours (offload + fused log-probs)"}


def make_marked_step(provider, model, optimizer, input_ids, keep, offloader, sizes):
    """`grpo_step.make_step`'s step with `phase_marker` calls; "log-probs" fires after the decoder's final norm."""
    from grpo_step import ours_logps, trl_logps
    from step_timeline import phase_marker

    logps_fn = trl_logps if provider == "trl" else ours_logps
    attention_mask = torch.ones_like(input_ids)
    advantages = torch.randn(input_ids.size(0), 1, device=input_ids.device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, norm = base.model, base.model.norm

    def marker(phase):
        def hook(*_):
            if torch.is_grad_enabled():  # not in the backward's recomputes
                phase_marker(phase)

        return hook

    def step():
        optimizer.zero_grad(set_to_none=True)
        # Each decoder pass (one per mini batch) starts a "forward", its final norm ends it.
        hooks = [decoder.register_forward_pre_hook(marker("forward")), norm.register_forward_hook(marker("log-probs"))]
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logps = logps_fn(model, input_ids, attention_mask, keep, offloader, sizes)
        finally:
            for hook in hooks:
                hook.remove()
        loss = -(torch.exp(logps - logps.detach()) * advantages).mean()
        phase_marker("backward")
        loss.backward()
        phase_marker("optimizer")
        optimizer.step()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--providers", nargs="+", default=["trl", "ours"], choices=sorted(LABELS))
    parser.add_argument("--tag", default="gpu")
    parser.add_argument("--out-dir", default=str(REPO / "docs"), help="Where the PNG goes (the JSON: its bench/).")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_memory_timeline.py needs CUDA.")
    from grpo_step import build_model, ours_sizes
    from step_timeline import plot_memory_timelines, record_step, step_components

    from trl_longctx.memory import CheckpointOffloader

    args.mode, args.mini_batch, args.mlp_tiles = "lora", None, None
    env = environment(torch.device("cuda"), ("transformers", "peft", "trl"))
    model, shape = build_model(args.model, args.lora_rank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    offloader = CheckpointOffloader()
    torch.manual_seed(0)
    ids = torch.randint(0, shape.vocab_size, (args.num_generations, args.prompt_length + args.length), device="cuda")
    panels, rows = {}, {}
    for provider in args.providers:
        sizes = ours_sizes(shape, args, args.length, optimizer) if provider == "ours" else (None, 1)
        step = make_marked_step(provider, model, optimizer, ids, args.length, offloader if provider == "ours" else None,
                                sizes)  # fmt: skip
        try:
            step()  # warm-up: AdamW states, pinned buffers, kernels
            series = step_components(record_step(step))
        except Exception as exc:  # noqa: BLE001 - OOM is a result
            if not is_oom(exc):
                raise
            rows[provider] = {"status": "OOM"}
        else:
            panels[LABELS[provider]] = series
            rows[provider] = {"status": "ok", "mini_batch": sizes[0], "mlp_tiles": sizes[1], **series}
            print(provider, f"peak {series['peak_GiB']:.2f} GiB (allocator {series['measured_peak_GiB']:.2f})",
                  {c: round(v, 2) for c, v in series["peak_by_component_GiB"].items()}, flush=True)  # fmt: skip
        del step
        optimizer.zero_grad(set_to_none=True)
        free_cuda()
    offloader.release()
    out = Path(args.out_dir) / "bench" / f"step_memory_timeline_{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "args": vars(args), "providers": rows}, indent=1))
    if panels:
        title = (f"One GRPO step, {args.model} LoRA r={args.lora_rank}, {args.num_generations} x ({args.prompt_length}"
                 f" + {args.length}) tokens, {env['device']}, {env['date'][:10]}")  # fmt: skip
        png = plot_memory_timelines(panels, Path(args.out_dir) / f"step_memory_timeline_{args.tag}.png", title=title)
        print("wrote", out, png)


if __name__ == "__main__":
    main()
