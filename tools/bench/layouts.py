"""Training passes of one GRPO batch in each `training_layout`: padded, packed, shared-prompt; samples/s and tokens/s.

Model: the architecture of `trl_longctx.memory.PRESETS[--model]` with random bf16 weights on CUDA, LoRA r=32 on
every linear layer, gradient checkpointing (non-reentrant), checkpoints offloaded (`CheckpointOffloader`, as the
trainer runs on CUDA), bf16 autocast, the Triton log-prob kernel (`tools/bench/grpo_step.build_model`). `--model
tiny` builds a tiny random Qwen3 on CPU instead, to check the script end to end (its timings mean nothing).

Batch, as TRL builds it: `--prompts` prompts x `--num-generations` completions; prompt lengths drawn uniformly from
`[--prompt-length / 2, --prompt-length]` (left-padded to the longest), completion lengths drawn from
`--completion-lengths` (`lognormal`: median `--max-completion-length / 4`, sigma 0.8, the draws above the maximum
truncated there as TRL truncates them; `uniform`: 1 to the maximum), right-padded to the longest; rows shuffled as TRL
shuffles a generation batch before a step. The same batch for every provider.

Providers (the log-prob pass of `trl_longctx.logprob_pass.run_log_prob_pass`, `--mini-batch` sequences per decoder
pass):
- ``padded-sdpa``: TRL's layout with the model's SDPA attention (what runs without a layout);
- ``padded-flex``: TRL's layout with `longctx_flex` attention (what the padded fallback of a layout runs on CUDA);
- ``packed`` and ``shared-prompt``: the layouts (`trl_longctx.training_layout`), `longctx_flex` with BlockMasks on
  CUDA (on CPU: SDPA with dense masks).

Modes: ``forward`` (no gradient: the old and reference log-probs of a generation batch) and ``full`` (forward, a
GRPO-like loss of the log-probs and entropies, backward: the training pass). Rows: provider x mode with `ms`
(p20/p50/p80), peak `GiB` above the inputs, `samples_per_s` (sequences / s) and `tokens_per_s` (the batch's real
tokens, each sequence's prompt counted once per sequence, / s: the same work in every layout), the tokens the
decoder ran, and the largest difference of the log-probs from ``padded-sdpa``'s on TRL's mask (bf16: rounding).

Example:
    PYTHONPATH=packages/trl_longctx/src:packages/kernels/src:packages/vllm_standby/src \
        python tools/bench/layouts.py --model qwen3-8b --prompts 2 --num-generations 8 --prompt-length 1024 \
        --max-completion-length 8192 --mini-batch 8 --out docs/bench/layouts.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, free_cuda, is_oom, markdown_table, peak_gib_above_current, time_ms  # noqa: E402

PROVIDERS = ("padded-sdpa", "padded-flex", "packed", "shared-prompt")
MODES = ("forward", "full")
EOS, PAD = 2, 0


def draw_batch(args, vocab_size: int, device: torch.device):
    """`(input_ids, attention_mask, logits_to_keep)` as TRL concatenates them (module docstring)."""
    generator = torch.Generator().manual_seed(args.seed)
    rows = args.prompts * args.num_generations
    low = max(1, args.prompt_length // 2)
    prompt_lengths = torch.randint(low, args.prompt_length + 1, (args.prompts,), generator=generator)
    maximum = args.max_completion_length
    if args.completion_lengths == "lognormal":
        draws = torch.exp(math.log(maximum / 4) + 0.8 * torch.randn(rows, generator=generator))
        completion_lengths = draws.round().long().clamp(1, maximum)
    else:
        completion_lengths = torch.randint(1, maximum + 1, (rows,), generator=generator)
    width, keep = int(prompt_lengths.max()), int(completion_lengths.max())
    input_ids = torch.full((rows, width + keep), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row in range(rows):
        p, c = int(prompt_lengths[row // args.num_generations]), int(completion_lengths[row])
        if row % args.num_generations == 0:
            prompt = torch.randint(3, vocab_size, (p,), generator=generator)
        input_ids[row, width - p : width] = prompt
        input_ids[row, width : width + c] = torch.randint(3, vocab_size, (c,), generator=generator)
        if c < maximum:
            input_ids[row, width + c - 1] = EOS  # ended early; a completion at the maximum was truncated
        attention_mask[row, width - p : width + c] = 1
    order = torch.randperm(rows, generator=generator)
    return input_ids[order].to(device), attention_mask[order].to(device), keep


def build(args, device: torch.device):
    """The model (LoRA, checkpointing on, training mode) and its preset shape (`None` for `tiny`)."""
    if args.model != "tiny":
        from grpo_step import build_model

        return build_model(args.model, args.lora_rank)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, target_modules="all-linear"))
    model.enable_input_require_grads()
    return model.train(), None


def set_attention(model, provider: str, device: torch.device) -> str:
    """Switch the model to the provider's attention (module docstring); returns its name."""
    from trl_longctx.attention import use_flex_attention

    if device.type == "cuda" and provider != "padded-sdpa":
        use_flex_attention(model)
    else:
        model.get_base_model().set_attn_implementation("sdpa")
    return model.get_base_model().config._attn_implementation


def make_pass(model, batch, provider: str, args, device: torch.device, offloader):
    """`run(grad)`: the provider's log-prob pass over `batch` (planned inside: planning is part of its cost), with a
    GRPO-like loss and its backward when `grad`; returns the log-probs."""
    from trl_longctx.logprob_pass import ChunkSizes, run_log_prob_pass
    from trl_longctx.model_heads import decoder_and_lm_head, plain_lm_head_weights
    from trl_longctx.training_layout import LayoutPlan, plan_layout

    input_ids, attention_mask, keep = batch
    decoder, lm_head = decoder_and_lm_head(model)
    head = plain_lm_head_weights(lm_head)
    sizes = ChunkSizes(args.mini_batch or input_ids.size(0), None, 1)
    backend = "triton" if device.type == "cuda" else "torch"
    mask = attention_mask[:, -keep:].float()
    advantages = torch.randn(input_ids.size(0), 1, generator=torch.Generator().manual_seed(1)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def run(grad: bool) -> torch.Tensor:
        plan = None
        if provider in ("packed", "shared-prompt"):
            plan = plan_layout(provider, input_ids, attention_mask, keep)
            if not isinstance(plan, LayoutPlan):
                raise RuntimeError(f"{provider} cannot take this batch: {plan}")
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad), autocast:
            logps, entropies, _ = run_log_prob_pass(
                model, decoder, head, input_ids, attention_mask, keep, sizes, backend=backend,
                offloader=offloader if grad else None, compute_entropy=grad, layout=plan,
            )  # fmt: skip
        if grad:
            ratio = torch.exp(logps - logps.detach())
            loss = -((ratio * advantages - 1e-3 * entropies) * mask).sum() / mask.sum()
            loss.backward()
        return logps.detach()

    return run


def decoder_tokens(provider: str, batch, mini_batch: int | None) -> int:
    """Tokens the decoder runs for the batch in the provider's layout."""
    from trl_longctx.training_layout import plan_layout

    input_ids, attention_mask, keep = batch
    if provider.startswith("padded"):
        return input_ids.numel()
    plan = plan_layout(provider, input_ids, attention_mask, keep)
    step = mini_batch or input_ids.size(0)
    return sum(plan.mini_batch(input_ids, s, s + step).tokens for s in range(0, input_ids.size(0), step))


def measure(args, device: torch.device) -> list[dict]:
    from trl_longctx.memory import CheckpointOffloader

    model, _ = build(args, device)
    batch = draw_batch(args, model.config.vocab_size, device)
    real_tokens = int(batch[1].sum())
    offloader = CheckpointOffloader() if args.offload and device.type == "cuda" else None
    rows, reference = [], None
    for provider in args.providers:
        attention = set_attention(model, provider, device)
        run = make_pass(model, batch, provider, args, device, offloader)
        for mode in args.modes:
            row = {"provider": provider, "mode": mode, "attention": attention, "model": args.model,
                   "sequences": batch[0].size(0), "real_tokens": real_tokens,
                   "decoder_tokens": decoder_tokens(provider, batch, args.mini_batch)}  # fmt: skip
            try:
                logps = run(mode == "full")
                ms = time_ms(lambda run=run, mode=mode: run(mode == "full"), device, warmup=args.warmup)
                gib = peak_gib_above_current(lambda run=run, mode=mode: run(mode == "full"), device)
            except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else is re-raised
                if not is_oom(exc):
                    raise
                rows.append({**row, "status": "OOM"})
                free_cuda()
                print(json.dumps(rows[-1]), flush=True)
                continue
            on_mask = batch[1][:, -batch[2] :].bool()
            if provider == "padded-sdpa" and mode == "forward":
                reference = logps
            difference = None if reference is None else (logps - reference)[on_mask].abs().max().item()
            seconds = ms["p50"] / 1e3
            rows.append({**row, "status": "ok", "ms": ms, "GiB": gib, "samples_per_s": row["sequences"] / seconds,
                         "tokens_per_s": real_tokens / seconds, "max_logp_difference": difference})  # fmt: skip
            free_cuda()
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"env": args.env, "args": vars(args), "rows": rows}, indent=1))
    if offloader is not None:
        offloader.release()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b", help="A `trl_longctx.memory.PRESETS` name, or tiny (CPU).")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=1024)
    parser.add_argument("--max-completion-length", type=int, default=8192)
    parser.add_argument("--completion-lengths", choices=("lognormal", "uniform"), default="lognormal")
    parser.add_argument("--mini-batch", type=int, help="Sequences per decoder pass (default: all).")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--no-offload", dest="offload", action="store_false", help="Keep the checkpoints on the GPU.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls first (flex attention compiles).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON output path (rewritten after every row).")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.model == "tiny" else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("layouts.py needs CUDA for a preset model (--model tiny runs on CPU).")
    args.env = environment(device, ("transformers", "peft", "trl"))
    rows = measure(args, device)
    table = [
        [r["provider"], r["mode"], r["attention"], r["decoder_tokens"], r.get("ms", {}).get("p50", r["status"]),
         r.get("GiB"), r.get("samples_per_s"), r.get("tokens_per_s"), r.get("max_logp_difference")]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(["provider", "mode", "attention", "decoder tokens", "ms p50", "GiB", "samples/s", "tokens/s",
                          "max |logp - padded-sdpa|"], table))  # fmt: skip


if __name__ == "__main__":
    main()
