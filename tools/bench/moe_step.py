"""One GRPO training step of a Mixture-of-Experts model at long context, TRL's path against ours: the longest
completion each fits and the seconds per step at the lengths both fit (issue 17).

Model: gpt-oss-20b or Qwen3-30B-A3B (`--model`), the architecture of its published config.json (gpt-oss-20b: 24
layers alternating 128-token sliding-window and full attention with sinks, 32 experts of 2,880, top 4, YaRN to
131,072 positions, its factor raised beyond that to cover the longest `--lengths`; Qwen3-30B-A3B: 48 layers of 128
experts of 768, top 8, with Qwen's YaRN factor 4 beyond 40,960 tokens), random bf16 weights built on the device.
PEFT LoRA r=`--lora-rank` on every linear layer (the attention), and with `--lora-experts` on both fused expert
weights of every MoE layer (`target_parameters`, as the recipes);
`--mode qlora` puts the attention's linear layers in bitsandbytes NF4, as `load_in_4bit` does (it cannot quantize the
fused expert weights, which stay bf16).
Gradient checkpointing (non-reentrant), bf16 autocast. Batch: `--num-generations` sequences of `--prompt-length + L`
random tokens, the last L scored. One step = the per-token log-probs and the router aux loss, TRL's GRPO loss with
`num_iterations=1` (ratio 1, random advantages) plus `router_aux_loss_coef` x the aux loss, backward, AdamW (at
learning rate 0, so that every step sees the same weights).

Providers:
- ``trl``: what TRL 1.16's `GRPOTrainer._get_per_token_logps_and_entropies` runs with its aux loss on (the model
  config's `router_aux_loss_coef` is non-zero): the model called with `labels`, `fused_lm_head=True` and
  `output_router_logits=True`, in the attention the model was loaded with (gpt-oss: `eager`, the one trainable
  attention with sinks that needs nothing from the Hub; Qwen3-MoE: `sdpa`).
- ``ours``: what `LongContextGRPOTrainer` runs: `trl_longctx.logprob_pass.LogProbPass` (the planner's sequences per
  decoder pass and MLP tiles for the memory free now, offloaded checkpoints, fused log-probs, the aux loss from the
  router logits of each decoder pass) in the attention `flex_attention=None` chooses (gpt-oss on CUDA: our flex
  attention with the sinks folded in).

A provider that runs out of memory at some L is skipped at every longer L. `--memory-gib` caps the process's device
memory (`torch.cuda.set_per_process_memory_fraction`) to stand for a smaller card. Every row carries the planner's
prediction for the path (`trl_longctx.memory.plan_memory`; TRL's eager attention is planned as SDPA, so its row
under-predicts) and, per provider, the mean log-prob and the aux loss of the step, which the two providers compute on
the same tokens (equal within bf16 rounding).

`--tiny --device cpu` runs a two-layer version on the CPU (the test of this script): `ours` there runs the model's own
attention and the torch backend, as the trainer does on a CPU.

Example (GPU):
    python tools/bench/moe_step.py --model gpt-oss-20b --lora-experts --lengths 4096 16384 32768 65536 98304 130816 \
        --out docs/bench/moe_step_gpt_oss_20b.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    GIB,
    cap_device_memory,
    environment,
    free_cuda,
    is_oom,
    last_pass_sizes,
    markdown_table,
    step_status,
    timed_steps,
)
from grpo_step import quantize_decoder_linears  # noqa: E402

PROVIDERS = ("trl", "ours")
MODELS = ("gpt-oss-20b", "qwen3-30b-a3b")
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(model: str, context: int, tiny: bool = False):
    """The transformers config of `model` as its published config.json has it (module docstring); `tiny`: two layers
    of 64 with 4 experts (top 2), a 256-token vocabulary, for the CPU."""
    import transformers

    from trl_longctx.memory import PRESETS

    if model not in MODELS:
        raise ValueError(f"--model must be one of {list(MODELS)}, got {model!r}.")
    if tiny:
        size = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 32, "num_experts_per_tok": 2}  # fmt: skip
        experts = {"intermediate_size": 48, "num_local_experts": 4}
        if model == "qwen3-30b-a3b":
            experts = {"intermediate_size": 96, "moe_intermediate_size": 48, "num_experts": 4}
    else:
        s = PRESETS[model]
        size = {"vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "num_hidden_layers": s.num_hidden_layers,
                "num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_key_value_heads,
                "head_dim": s.head_dim, "num_experts_per_tok": s.num_experts_per_tok}  # fmt: skip
        experts = {"intermediate_size": s.moe_intermediate_size, "num_local_experts": s.num_experts}
        if model == "qwen3-30b-a3b":
            experts = {"intermediate_size": s.intermediate_size, "moe_intermediate_size": s.moe_intermediate_size,
                       "num_experts": s.num_experts}  # fmt: skip
    layers = size["num_hidden_layers"]
    if model == "gpt-oss-20b":
        # Beyond its 131,072 positions (YaRN factor 32 over 4,096), the YaRN factor grows to cover `context`, as
        # long-context runs of gpt-oss extend it.
        factor = max(32, math.ceil(context / 4096))
        config = transformers.GptOssConfig(
            **size, **experts, sliding_window=128, max_position_embeddings=factor * 4096, tie_word_embeddings=False,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
            rope_parameters={"rope_type": "yarn", "factor": float(factor), "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
        )  # fmt: skip
        config._attn_implementation = "eager"
    else:
        rope = {"rope_type": "default", "rope_theta": 1e6}
        if context > 40960:
            rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
        config = transformers.Qwen3MoeConfig(
            **size, **experts, max_position_embeddings=max(40960, context), norm_topk_prob=True,
            tie_word_embeddings=False, rope_parameters=rope,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
    return config


def build_model(
    config, lora_rank: int, lora_experts: bool, device: torch.device, dtype: torch.dtype, mode: str = "lora"
):
    """Random `config` model on `device` with TRL's fused lm_head added (as `GRPOTrainer.__init__` does), `qlora`: the
    attention's linear layers in NF4 (bitsandbytes cannot quantize fused expert weights, which stay bf16, as
    `load_in_4bit` leaves them), PEFT LoRA (bf16), gradient checkpointing; returns `(model, attention it was loaded
    with)`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    if mode == "qlora":
        quantize_decoder_linears(model)
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules="all-linear",
                      target_parameters=EXPERT_PARAMETERS if lora_experts else None)  # fmt: skip
    model = get_peft_model(model, lora)
    if mode == "qlora":
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
    model.enable_input_require_grads()
    model.train()
    return model, config._attn_implementation


def trainer_args(output_dir: str, device: torch.device):
    """The trainer config the `ours` provider plans and runs by: every log-prob field at its default."""
    from trl_longctx import LongContextGRPOConfig

    return LongContextGRPOConfig(output_dir=output_dir, report_to="none", bf16=device.type == "cuda",
                                 use_cpu=device.type == "cpu")  # fmt: skip


class Providers:
    """The two log-prob paths over one model, each switching the model to the attention it runs."""

    def __init__(self, model, loaded_attention: str, args, device: torch.device, lora_rank: int, lora_experts: bool):
        from trl_longctx.attention import choose_attention, use_flex_attention
        from trl_longctx.logprob_pass import LogProbPass
        from trl_longctx.model_heads import decoder_and_lm_head, plain_lm_head_weights
        from trl_longctx.moe_aux import router_aux_loss

        self.model, self.device, self.loaded_attention = model, device, loaded_attention
        self.choice = choose_attention(args.flex_attention, model, device)
        self._use_flex = use_flex_attention
        self.aux = router_aux_loss(model)
        decoder, lm_head = decoder_and_lm_head(model)
        self.decoder, self.head = decoder, plain_lm_head_weights(lm_head)
        mode = "qlora" if getattr(model.get_base_model(), "is_loaded_in_4bit", False) else "lora"
        self.logprob_pass = LogProbPass(args, device, mode=mode, lora_rank=lora_rank,
                                        attention=self.choice.implementation, lora_experts=lora_experts)  # fmt: skip
        self.coef = model.get_base_model().config.router_aux_loss_coef

    def attention(self, provider: str) -> str:
        """Switch the model to the attention `provider` runs; returns its name."""
        base = self.model.get_base_model()
        if provider == "ours" and self.choice.ours:
            self._use_flex(self.model)
        else:
            base.set_attn_implementation(self.loaded_attention)
        return base.config._attn_implementation

    def logps_and_aux(self, provider: str, input_ids, attention_mask, keep: int, optimizer_states: bool):
        if provider == "trl":
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            labels[:, :-keep] = -100
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                             output_router_logits=True)  # fmt: skip
            return out.log_probs[:, -keep:], out.aux_loss
        self.logprob_pass.begin_try()
        logps, _, aux = self.logprob_pass(
            self.model, self.decoder, self.head, input_ids, attention_mask, keep, aux_loss=self.aux,
            optimizer_states_allocated=optimizer_states,
        )  # fmt: skip
        return logps, aux


def make_step(providers: Providers, provider: str, optimizer, input_ids, keep: int):
    """One GRPO step; returns `(mean log-prob, aux loss)` of its forward."""
    attention_mask = torch.ones_like(input_ids)
    advantages = torch.randn(input_ids.size(0), 1, device=input_ids.device, generator=None)
    autocast = torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=input_ids.device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logps, aux = providers.logps_and_aux(provider, input_ids, attention_mask, keep, bool(optimizer.state))
        loss = -(torch.exp(logps - logps.detach()) * advantages).mean() + providers.coef * aux
        loss.backward()
        optimizer.step()
        return logps.detach().float().mean().item(), aux.detach().float().item()

    return step


def predicted_gib(shape, provider: str, args, length: int, attention: str, sizes) -> float | None:
    from trl_longctx.memory import plan_memory
    from trl_longctx.memory.planner import ATTENTIONS, TrainSetup

    if shape is None:
        return None
    setup = TrainSetup.for_path(provider, args.num_generations, args.prompt_length, length, lora_rank=args.lora_rank,
                                mode=args.mode, lora_experts=args.lora_experts,
                                attention=attention if attention in ATTENTIONS else "sdpa",
                                grpo_mini_batch=sizes[0], tiled_mlp_chunks=sizes[1])  # fmt: skip
    return plan_memory(shape, setup).allocated / GIB


def run(args) -> list[dict]:
    from trl_longctx.memory import PRESETS

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cap = cap_device_memory(device, args.memory_gib) if args.memory_gib is not None else None
    config = moe_config(args.model, args.prompt_length + max(args.lengths), args.tiny)
    model, loaded = build_model(config, args.lora_rank, args.lora_experts, device, dtype, args.mode)
    # lr 0: the optimizer step runs (and is timed) but leaves the weights as they were, so that every provider's
    # step sees the same model and their log-probs and aux losses can be compared.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    shape = None if args.tiny else PRESETS[args.model]
    rows, done_oom = [], set()
    with tempfile.TemporaryDirectory() as output_dir:
        providers = Providers(model, loaded, trainer_args(output_dir, device), device, args.lora_rank,
                              args.lora_experts)  # fmt: skip
        print(providers.choice.describe(), flush=True)
        if cap is not None:
            # The planner reads the device's free memory, which the cap does not lower: it plans for the cap instead.
            providers.logprob_pass.free_bytes = lambda: cap - torch.cuda.memory_allocated(device)
        for length in args.lengths:
            for provider in args.providers:
                attention = providers.attention(provider)
                row = {"provider": provider, "model": args.model, "L": length, "B": args.num_generations,
                       "prompt_length": args.prompt_length, "mode": args.mode, "lora_experts": args.lora_experts,
                       "attention": attention, "memory_gib": args.memory_gib}  # fmt: skip
                if provider in done_oom:
                    rows.append({**row, "status": "skipped (OOM at a shorter L)"})
                    continue
                torch.manual_seed(length)
                ids = torch.randint(0, config.vocab_size, (args.num_generations, args.prompt_length + length),
                                    device=device)  # fmt: skip
                step = make_step(providers, provider, optimizer, ids, length)
                try:
                    count = 1 + (args.repeats if length <= args.repeat_up_to else 0)
                    timing, (mean_logp, aux_loss) = timed_steps(step, device, count)
                except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else is re-raised
                    if not is_oom(exc):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    done_oom.add(provider)
                    rows.append({**row, "status": "OOM"})
                else:
                    sizes = last_pass_sizes(providers.logprob_pass) if provider == "ours" else (None, 1)
                    if provider == "ours":
                        row["mini_batch"], row["mlp_tiles"] = sizes
                    predicted = predicted_gib(shape, provider, args, length, attention, sizes)
                    status = step_status(mean_logp=mean_logp, aux_loss=aux_loss)
                    rows.append({**row, "status": status, **timing, "predicted_GiB": predicted, "mean_logp": mean_logp,
                                 "aux_loss": aux_loss})  # fmt: skip
                del step, ids
                if device.type == "cuda":
                    free_cuda()
                print(json.dumps(rows[-1]), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({"env": args.env, "rows": rows}, indent=1))
        providers.logprob_pass.offloader.release()
    return rows


def longest(rows: list[dict]) -> dict[str, int | None]:
    """The longest completion each provider trained (`None`: none)."""
    best: dict[str, int | None] = {}
    for row in rows:
        best.setdefault(row["provider"], None)
        if row["status"] == "ok":
            best[row["provider"]] = max(best[row["provider"]] or 0, row["L"])
    return best


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-oss-20b", choices=MODELS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-experts", action="store_true", help="LoRA on both fused expert weights too.")
    parser.add_argument(
        "--mode",
        choices=("lora", "qlora"),
        default="lora",
        help="qlora: the attention's linear layers in NF4; the fused experts stay bf16.",
    )
    parser.add_argument("--repeats", type=int, default=0, help="Timed steps after the first (which is timed apart).")
    parser.add_argument(
        "--repeat-up-to",
        type=int,
        default=1 << 30,
        help="Only lengths up to this one get --repeats; longer ones run their first step only.",
    )
    parser.add_argument("--memory-gib", type=float, help="Cap the process's device memory at this many GiB.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="A two-layer version of --model (CPU test).")
    parser.add_argument("--out", help="JSON output path (rewritten after every point).")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("moe_step.py: --device cuda needs CUDA; --tiny --device cpu runs on the CPU.")
    if (args.memory_gib is not None or args.mode == "qlora") and not args.device.startswith("cuda"):
        raise SystemExit(f"moe_step.py: --memory-gib and --mode qlora need CUDA; got --device {args.device}.")
    args.lengths = sorted(args.lengths)
    args.env = environment(torch.device(args.device), ("transformers", "peft", "trl"))
    rows = run(args)
    table = [[r["provider"], r["L"], r["attention"], r.get("s") if r["status"] == "ok" else r["status"], r.get("GiB"),
              r.get("predicted_GiB"), r.get("mini_batch"), r.get("mlp_tiles"), r.get("aux_loss")] for r in rows]  # fmt: skip
    print(markdown_table(["provider", "L", "attention", "step s", "peak GiB", "planner GiB", "seqs/pass", "MLP tiles",
                          "aux loss"], table))  # fmt: skip
    print("longest completion trained:", longest(rows))
    return rows


if __name__ == "__main__":
    main()
