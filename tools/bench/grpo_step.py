"""One GRPO training step on a Qwen3-8B (or Llama-3.1-8B) architecture: step time and peak memory per completion length.

Model: the architecture of `trl_longctx.memory.PRESETS[--model]` (Qwen3 classes for `qwen3-*`, Llama classes
otherwise) with random bf16 weights built on CUDA, PEFT LoRA
r=32 on every linear layer of the decoder, gradient checkpointing (non-reentrant), SDPA attention, bf16 autocast as
TRL runs it. Batch: `--num-generations` sequences of `--prompt-length + L` random tokens. One step = the policy's
per-token log-probs of the L completion tokens, TRL's GRPO loss with `num_iterations=1` (ratio 1, random
advantages), backward and an AdamW step over the LoRA parameters.

Providers (log-prob path of that step):
- ``trl``: what TRL 1.16's `GRPOTrainer._get_per_token_logps_and_entropies` runs: the model called with `labels`
  and `fused_lm_head=True`, log-probs read from `outputs.log_probs`.
- ``ours``: what `LongContextGRPOTrainer` runs: the decoder inside `CheckpointOffloader.offload` (checkpointed layer
  inputs in pinned host memory), then `longctx_kernels.selective_logprobs` in chunks.
- ``ours-no-offload``: the same with the checkpoints left on the GPU.

Rows: provider x L x metric (`s`, `GiB`) with the planner's prediction (`trl_longctx.memory.plan_memory`) next to the
measured peak (`torch.cuda.max_memory_allocated`, absolute: weights included). OOM is recorded as OOM.

Example:
    PYTHONPATH=packages/trl_longctx/src:packages/kernels/src:packages/vllm_standby/src \
        python tools/bench/grpo_step.py --lengths 4096 32768 --out docs/bench/grpo_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, environment, free_cuda, is_oom, markdown_table  # noqa: E402

PROVIDERS = ("trl", "ours", "ours-no-offload")


def quantize_decoder_linears(model) -> int:
    """Replace every linear layer of the decoder layers (a vision-language model's language decoder) by a bitsandbytes
    NF4 `Linear4bit` (double quantization, bf16 compute; the bias kept in bf16), quantizing the random bf16 weights in
    place on the GPU, as
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` loads a
    checkpoint. Embeddings, norms, the lm_head, a vision tower and fused MoE expert weights (not `nn.Linear`) stay
    bf16. Returns the number of layers quantized."""
    import bitsandbytes as bnb

    count = 0
    for layer in model.get_decoder().layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")  # fmt: skip
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(child.weight.device)
                if child.bias is not None:  # built on meta above: without this the layer adds uninitialized memory
                    quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, quantized)
                count += 1
        torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True
    return count


def build_model(preset: str, lora_rank: int, mode: str = "lora"):
    """Random bf16 model of the preset's architecture on CUDA (`qlora`: decoder linears in NF4), LoRA on all linear
    layers (bf16 adapters for QLoRA, as TRL casts them), checkpointing on."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from trl_longctx.memory import PRESETS

    shape = PRESETS[preset]
    config_cls = Qwen3Config if preset.startswith("qwen3") else LlamaConfig
    config = config_cls(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=262144,
        attn_implementation="sdpa",
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # What `GRPOTrainer.__init__` does before training (on the base model, before PEFT wraps it): `fused_lm_head=True`
    # then returns per-token log-probs. Without trl installed the ``trl`` provider is reported as missing.
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        add_fused_lm_head = None
    if add_fused_lm_head is not None:
        add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    if mode == "qlora":
        quantize_decoder_linears(model)
    model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear"))
    if mode == "qlora":
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
    model.enable_input_require_grads()
    model.train()
    return model, shape


def trl_logps(model, input_ids, attention_mask, keep, offloader, sizes=None):
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-keep] = -100
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    return outputs.log_probs[:, -keep:]


def ours_logps(model, input_ids, attention_mask, keep, offloader, sizes=(None, 1)):
    """What `LongContextGRPOTrainer._get_per_token_logps_and_entropies` runs (`trl_longctx.logprob_pass`):
    `sizes = (mini batch, MLP tiles)`; the Triton backend (no logit chunk)."""
    from trl_longctx.logprob_pass import ChunkSizes, run_log_prob_pass
    from trl_longctx.model_heads import decoder_and_lm_head, plain_lm_head_weights

    decoder, lm_head = decoder_and_lm_head(model)
    mini_batch, tiles = sizes
    chunk_sizes = ChunkSizes(mini_batch or input_ids.size(0), None, tiles)
    logps, _, _ = run_log_prob_pass(
        model, decoder, plain_lm_head_weights(lm_head), input_ids, attention_mask, keep, chunk_sizes,
        backend="triton", offloader=offloader,
    )  # fmt: skip
    return logps


def make_step(provider, model, optimizer, input_ids, keep, offloader, sizes=(None, 1)):
    attention_mask = torch.ones_like(input_ids)
    logps_fn = trl_logps if provider == "trl" else ours_logps
    advantages = torch.randn(input_ids.size(0), 1, device=input_ids.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps = logps_fn(model, input_ids, attention_mask, keep, offloader, sizes)
        # TRL's loss with num_iterations=1: ratio exp(logp - logp.detach()) = 1, gradient = advantage.
        loss = -(torch.exp(logps - logps.detach()) * advantages).mean()
        loss.backward()
        optimizer.step()

    return step


def measure(step, repeats: int) -> tuple[list[float], float, float]:
    """Seconds per step (the first call is a warm-up, timed apart; `repeats=0`: the first call only, pinned buffer
    allocation included), the peak allocated GiB, and the first call's seconds."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    MEMORY_AFTER_STEP.clear()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    if repeats == 0:
        return [first], torch.cuda.max_memory_allocated() / GIB, first
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        MEMORY_AFTER_STEP.append((torch.cuda.memory_allocated() / GIB, _rss_gib()))
    return seconds, torch.cuda.max_memory_allocated() / GIB, first


# (GPU allocated GiB, host RSS GiB) after each timed step of the last `measure` (growth check over many steps).
MEMORY_AFTER_STEP: list[tuple[float, float]] = []


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def predicted_gib(shape, provider: str, args, length: int, sizes=(None, 1)) -> float:
    from trl_longctx.memory import plan_memory
    from trl_longctx.memory.planner import TrainSetup

    setup = TrainSetup.for_path(provider, args.num_generations, args.prompt_length, length, lora_rank=args.lora_rank,
                                mode=args.mode, grpo_mini_batch=sizes[0], tiled_mlp_chunks=sizes[1])  # fmt: skip
    return plan_memory(shape, setup).allocated / GIB


def ours_sizes(shape, args, length: int, optimizer) -> tuple[int | None, int]:
    """`(mini batch, MLP tiles)` of the `ours` provider: `--mini-batch`/`--mlp-tiles`, or what the trainer's planner
    picks on this GPU for what is free now (`trl_longctx.logprob_pass.LogProbPass.sizes` on the first step)."""
    from trl_longctx.memory.planner import auto_chunk_sizes

    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    sizes = auto_chunk_sizes(shape, free, args.num_generations, args.prompt_length, length, mode=args.mode,
                             lora_rank=args.lora_rank, tile_mlps=args.mlp_tiles is None,
                             grpo_mini_batch=args.mini_batch, optimizer_states_allocated=bool(optimizer.state))  # fmt: skip
    return args.mini_batch or sizes.grpo_mini_batch, args.mlp_tiles or sizes.tiled_mlp_chunks


def run(args) -> list[dict]:
    from trl_longctx.memory import CheckpointOffloader

    model, shape = build_model(args.model, args.lora_rank, args.mode)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    offloader = CheckpointOffloader()
    rows, done_oom = [], set()
    warm_up_s = None
    if args.warm_up and "ours" in args.providers:
        # What the trainer does once it is built (`warm_up_kernels`): the kernels compiled before the first step.
        from longctx_kernels.warmup import warm_up_in_background
        from trl_longctx.model_heads import decoder_and_lm_head, plain_lm_head_weights

        weight, bias = plain_lm_head_weights(decoder_and_lm_head(model)[1])
        handle = warm_up_in_background(weight, bias)
        handle.wait()
        warm_up_s = handle.seconds
        print(f"Triton warm-up: {handle.calls} calls in {warm_up_s:.1f} s", flush=True)
    for length in args.lengths:
        for provider in args.providers:
            row = {"provider": provider, "model": args.model, "L": length, "B": args.num_generations,
                   "prompt_length": args.prompt_length, "mode": args.mode, "warm_up_s": warm_up_s}  # fmt: skip
            sizes = ours_sizes(shape, args, length, optimizer) if provider == "ours" else (None, 1)
            if provider == "ours":
                row["mini_batch"], row["mlp_tiles"] = sizes
            row["predicted_GiB"] = predicted_gib(shape, provider, args, length, sizes)
            if provider in done_oom:
                rows.append({**row, "status": "skipped (OOM at a shorter L)"})
                continue
            torch.manual_seed(length)
            ids = torch.randint(
                0, shape.vocab_size, (args.num_generations, args.prompt_length + length), device="cuda"
            )
            step = make_step(provider, model, optimizer, ids, length, offloader if provider == "ours" else None, sizes)
            pool_before = offloader.allocation_record
            try:
                seconds, peak, first = measure(step, args.repeats)
            except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else is re-raised
                if not is_oom(exc):
                    raise
                optimizer.zero_grad(set_to_none=True)
                done_oom.add(provider)
                rows.append({**row, "status": "OOM"})
            else:
                if len(MEMORY_AFTER_STEP) >= 10:  # many steps: the growth check (allocated and RSS after each)
                    row["memory_after_step_GiB"] = list(MEMORY_AFTER_STEP)
                # Host buffers are allocated (and pinned) in the first call only: what that cost of its time.
                grown = offloader.allocation_record.since(pool_before)
                buffers = {"count": grown.count, "GiB": grown.nbytes / GIB, "s": grown.seconds}
                rows.append({**row, "status": "ok", "s": sorted(seconds)[len(seconds) // 2], "s_all": seconds,
                             "first_s": first, "first_host_buffers": buffers,
                             "GiB": peak, "pinned_host_GiB": offloader.pool_bytes / GIB if provider == "ours" else 0.0})  # fmt: skip
            del step, ids
            free_cuda()
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"env": args.env, "rows": rows}, indent=1))
    offloader.release()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument(
        "--mode",
        choices=("lora", "qlora"),
        default="lora",
        help="qlora: decoder linears in bitsandbytes NF4 (double quantization), bf16 adapters.",
    )
    parser.add_argument("--mini-batch", type=int, help="ours: sequences per decoder pass (default: the planner's).")
    parser.add_argument("--mlp-tiles", type=int, help="ours: MLP tiles (default: the planner's; 1 = untiled).")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Timed steps per point after one warm-up step; 0: one step, timed (no warm-up).",
    )
    parser.add_argument(
        "--warm-up",
        action="store_true",
        help="ours: compile the Triton kernels before the first step (`longctx_kernels.warmup`), as the trainer does.",
    )
    parser.add_argument("--out", help="JSON output path (rewritten after every point).")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("grpo_step.py needs CUDA.")
    args.env = environment(torch.device("cuda"), ("transformers", "peft", "trl"))
    rows = run(args)
    table = [
        [r["provider"], r["L"], r.get("s"), r.get("GiB") if r["status"] == "ok" else r["status"], r["predicted_GiB"],
         (r["GiB"] / r["predicted_GiB"] - 1) * 100 if r["status"] == "ok" else None]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(["provider", "L", "step s", "peak GiB", "planner GiB", "planner error %"], table))


if __name__ == "__main__":
    main()
