"""FP8 shared weights (`vllm_fp8_weights`) on the GPU: base-layer matmuls, rollout tokens/s, GRPO s/step and memory,
and the gap between the FP8 sampler's log-probs and the trainer's, against bf16 shared weights and TRL's colocate mode.

Each engine runs in its own process (one sleep-mode vLLM per process); `all` runs the measurements one after another
and writes one JSON (`--out`), then prints a markdown table.

- ``matmul --shapes qwen3-8b``: one frozen base layer, forward and input gradient as the trainer runs it, per layer
  shape of the preset (q, k/v, o, gate/up, down) and token count: bf16 ``nn.Linear`` against ``Fp8Linear`` with
  ``dequantize`` (W8A16, what the rollout plan picks) and with ``scaled_mm`` (``torch._scaled_mm`` on per-token FP8
  activations, W8A8, as vLLM multiplies); ms p20/p50/p80, peak GiB above the inputs, and the
  output's relative error against float64. This says where the FP8 matmul is faster than dequantizing.
- ``rollout --weights bf16|per-channel|per-tensor|per-block``: the shared-weights engine as the trainer builds it
  (`vllm_standby.StandbyLLM`, LoRA on, `quantization="fp8_per_*"` for FP8) on random weights saved to disk; tokens/s
  sampling `--seqs` x `--tokens` and 2 x `--tokens` (a GRPO group) with a non-zero in-memory LoRA adapter and
  without; vLLM's weight GiB; the trainer's shared model checked by data pointers; the log-prob gap (mean, max) of
  the sampled tokens, vLLM against the trainer's model, without and with the adapter.
- ``grpo --trainer ours|trl --weights ...``: LoRA GRPO steps as `colocate.py grpo` runs them (2 generations, prompt
  256, completions forced to `--length`): s/step, rollout / scoring / train seconds, peak allocated and device memory
  (sampled), device memory between steps, and per step TRL's `sampling/sampling_logp_difference` (mean, max) and
  `sampling/importance_sampling_ratio` (min, mean, max). `trl` is TRL 1.16 colocate as its docs teach it (sleep mode,
  utilization 0.3; bf16 only), the peer. `--fp8-matmul` overrides the FP8 layers' matmul.

Example (on the GPU, vLLM 0.25 and TRL 1.16 on the path: `source tools/bench/gpu_env.sh`):
    python tools/bench/fp8_rollout.py all --out docs/bench/fp8_rollout_h200.json
On the CPU: `matmul --shapes tiny` runs (torch's CPU `_scaled_mm`; its timings mean nothing), `rollout --preset tiny
--weights per-channel` runs on vLLM's CPU build, and `grpo --preset tiny --weights per-channel` is refused by the
rollout plan before anything loads; the row records the refusal (`status: "refused"`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, child_row, environment, markdown_table, peak_gib_above_current, time_ms  # noqa: E402

WEIGHTS = ("bf16", "per-channel", "per-tensor", "per-block")
FP8_MATMULS = ("auto", "scaled_mm", "dequantize")
PROMPT_LEN = 256
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/bench_fp8"))
# Layer shapes (out, in) of the presets: q, k/v, o, gate/up, down.
TINY_SHAPES = {"q_proj": (128, 128), "k_proj": (64, 128), "o_proj": (128, 128), "gate_proj": (256, 128),
               "down_proj": (128, 256)}  # fmt: skip


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def layer_shapes(preset: str) -> dict[str, tuple[int, int]]:
    if preset == "tiny":
        return TINY_SHAPES
    from trl_longctx.memory import PRESETS

    s = PRESETS[preset]
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    h, i = s.hidden_size, s.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h), "down_proj": (h, i)}


# ---------------------------------------------------------------- matmul


def cmd_matmul(args) -> dict:
    """bf16 `nn.Linear` vs `Fp8Linear` (dequantize, scaled_mm): forward + input gradient per shape and token count."""
    from vllm_standby.fp8_linear import Fp8Linear

    device = _device()
    rows = []
    for name, (out, cols) in layer_shapes(args.shapes).items():
        weight = torch.randn(out, cols, device=device) * 0.02
        scale = (weight.abs().amax(dim=1, keepdim=True) / 448.0).float()
        codes = (weight / scale).to(torch.float8_e4m3fn)
        dequantized = codes.float() * scale
        dense = torch.nn.Linear(cols, out, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
        dense.weight.copy_(dequantized)
        layers = {"bf16": dense}
        for matmul in ("dequantize", "scaled_mm"):
            try:
                layers[f"fp8-{matmul}"] = Fp8Linear(codes, scale, compute_dtype=torch.bfloat16, matmul=matmul)
            except ValueError as error:  # scaled_mm where it cannot run: recorded, not measured
                rows.append({"what": "matmul", "layer": name, "provider": f"fp8-{matmul}", "status": str(error)})
        for tokens in args.tokens:
            x = torch.randn(tokens, cols, device=device, dtype=torch.bfloat16)
            grad = torch.randn(tokens, out, device=device, dtype=torch.bfloat16)
            reference = (x[:64].double() @ dequantized.double().T).cpu()
            for provider, layer in layers.items():
                x.requires_grad_(True)

                def step(layer=layer, x=x, grad=grad):
                    x.grad = None
                    layer(x).backward(grad)

                ms = time_ms(step, device)
                peak = peak_gib_above_current(step, device)
                with torch.no_grad():
                    got = layer(x[:64]).double().cpu()
                error = ((got - reference).norm() / reference.norm()).item()
                rows.append({"what": "matmul", "layer": name, "shape": [out, cols], "tokens": tokens,
                             "provider": provider, "mode": "forward+input-grad", "ms": ms, "peak_GiB": peak,
                             "rel_error_vs_float64": error})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return {"what": "matmul", "shapes": args.shapes, "rows": rows}


# ---------------------------------------------------------------- rollout


def model_dir(preset: str, max_len: int) -> str:
    """A checkpoint folder with random bf16 weights (FP8 quantizes real tensors: no `load_format="dummy"`)."""
    if preset == "tiny":
        from trl_longctx.tiny_models import save_tiny_model

        path = WORK / "tiny"
        if not (path / "config.json").exists():
            save_tiny_model(path)
        return str(path)
    from colocate import model_dir as colocate_model_dir

    return colocate_model_dir(preset, max_len, weights=True)


def _engine(args, path: str, max_len: int):
    from vllm_standby import StandbyLLM
    from vllm_standby.shared_fp8 import VLLM_QUANTIZATION

    quantization = {} if args.weights == "bf16" else {"quantization": VLLM_QUANTIZATION[args.weights]}
    return StandbyLLM(
        model=path, dtype="bfloat16", max_model_len=max_len, seed=0, max_num_seqs=max(args.seqs, 2),
        enable_lora=True, max_lora_rank=32, max_loras=1, enforce_eager=not torch.cuda.is_available(),
        fast_start=torch.cuda.is_available(),  # as the trainer builds its shared engine
        **({"gpu_memory_utilization": 0.9} if torch.cuda.is_available() else {"kv_cache_memory_bytes": 256 * 2**20}),
        **quantization,
    )  # fmt: skip


def sampled_logprob_gap(llm, model, prompts, tokens: int, lora_request=None) -> dict[str, float]:
    """|log p_model - log p_vLLM| of vLLM's sampled tokens (what TRL's sampling_logp_difference measures)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=0, seed=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request)
    device = next(model.parameters()).device
    gaps = []
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(out.outputs[0].token_ids)
        sampled = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, ids, strict=True)])
        seq = torch.tensor([prompt + ids], device=device)
        with torch.no_grad():
            logps = torch.log_softmax(model(seq).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        ours = logps.gather(1, seq[0, len(prompt) :, None])[:, 0].cpu()
        gaps.append((ours - sampled).abs())
    gap = torch.cat(gaps)
    return {"mean": gap.mean().item(), "max": gap.max().item()}


def cmd_rollout(args) -> dict:
    from peft import LoraConfig, get_peft_model

    import vllm_standby
    from vllm_standby._worker import model_of

    max_len = PROMPT_LEN + args.tokens + 8
    path = model_dir(args.preset, max_len)
    start = time.perf_counter()
    llm = _engine(args, path, max_len)
    row = {"what": "rollout", "weights": args.weights, "preset": args.preset, "startup_s": time.perf_counter() - start}
    vllm_model = llm.collective_rpc(model_of)[0]
    row["vllm_weights_GiB"] = sum(p.numel() * p.element_size() for p in vllm_model.parameters()) / GIB
    hf = vllm_standby.shared_hf_model(llm)
    storages = {p.untyped_storage().data_ptr() for p in vllm_model.parameters()}
    row["one_copy"] = all(p.untyped_storage().data_ptr() in storages for p in hf.parameters())
    vocab = hf.config.vocab_size
    prompts = torch.randint(3, vocab, (args.seqs, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).tolist()
    peft_model = get_peft_model(hf, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))
    for p in peft_model.parameters():  # a non-zero adapter (PEFT starts B at zero)
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.01)
    request = vllm_standby.lora_request(peft_model)
    from vllm import SamplingParams

    sample = SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=0)

    def tokens_per_s(batch: int, **kwargs) -> float:
        def once() -> float:
            _sync()
            begin = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:batch]], sample, use_tqdm=False, **kwargs)
            _sync()
            return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - begin)

        once()  # warm-up
        return statistics.median(once() for _ in range(args.repeats))

    row["tok_s"], row["tok_s_b2"] = tokens_per_s(args.seqs), tokens_per_s(2)
    row["tok_s_lora"], row["tok_s_b2_lora"] = (
        tokens_per_s(args.seqs, lora_request=request),
        tokens_per_s(2, lora_request=request),
    )
    with peft_model.disable_adapter():
        row["logp_gap"] = sampled_logprob_gap(llm, peft_model, prompts[:2], min(args.tokens, 256))
    row["logp_gap_lora"] = sampled_logprob_gap(llm, peft_model, prompts[:2], min(args.tokens, 256), request)
    return row


# ---------------------------------------------------------------- GRPO


def cmd_grpo(args) -> dict:
    from peft import LoraConfig

    if args.trainer == "trl" and args.weights != "bf16":
        raise SystemExit("--trainer trl runs bf16 weights only (TRL has no FP8 shared weights).")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    path = model_dir(args.preset, PROMPT_LEN + args.length + 8)
    on_gpu = torch.cuda.is_available()
    common = {
        "output_dir": str(WORK / f"run-{args.trainer}-{args.weights}"), "per_device_train_batch_size": 2,
        "num_generations": 2, "max_completion_length": args.length, "max_steps": args.steps, "learning_rate": 1e-5,
        "bf16": on_gpu, "use_cpu": not on_gpu, "gradient_checkpointing": True, "logging_steps": 1, "report_to": "none",
        "save_strategy": "no", "use_vllm": True, "vllm_mode": "colocate", "seed": 0,
        "vllm_max_model_length": PROMPT_LEN + args.length + 8, "generation_kwargs": {"ignore_eos": True},
        "model_init_kwargs": {"dtype": "bfloat16"},
    }  # fmt: skip
    lora = LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM")
    row = {"what": "grpo_step", "trainer": args.trainer, "weights": args.weights, "L": args.length}
    start = time.perf_counter()
    try:
        trainer = _grpo_trainer(args, path, common, lora)
    except ValueError as error:  # the rollout plan's refusal (e.g. FP8 on the CPU): before anything loaded
        return {**row, "status": "refused", "error": str(error)}
    return {**row, "init_s": time.perf_counter() - start, **_train_and_measure(args, trainer)}


def _grpo_trainer(args, path: str, common: dict, lora):
    from datasets import Dataset

    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    if args.preset == "tiny":
        dataset = Dataset.from_dict({"prompt": ["abc " * 8] * 16})
    else:
        prompts = torch.randint(3, vocab, (16, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).tolist()
        dataset = Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in p) for p in prompts]})

    def reward(completions, **kwargs):
        return [float(len(c) % 7) for c in completions]

    if args.trainer == "trl":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=0.3, **common)
        return GRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=dataset, peft_config=lora)
    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer

    fp8 = None if args.weights == "bf16" else args.weights
    config = LongContextGRPOConfig(vllm_gpu_memory_utilization=0.9, vllm_fp8_weights=fp8, **common)
    trainer = LongContextGRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=dataset,
                                     peft_config=lora)  # fmt: skip
    if fp8 is not None and args.fp8_matmul != "auto":
        from vllm_standby.fp8_linear import set_matmul

        set_matmul(trainer.model, args.fp8_matmul)
    return trainer


def _train_and_measure(args, trainer) -> dict:
    from colocate import StepTimer, _phase_split, time_phases

    from trl_longctx.device_memory import DeviceMemorySampler
    from vllm_standby.fp8_linear import matmul_summary

    on_gpu = torch.cuda.is_available()
    timer = StepTimer() if on_gpu else None
    if timer is not None:
        trainer.add_callback(timer.callback)
        torch.cuda.reset_peak_memory_stats()
    names = ("_generate_single_turn", "_generate_and_score_completions", "training_step")
    # colocate.py's timers synchronize CUDA: on the CPU (a smoke run) only the wall clock is kept.
    phases = time_phases(trainer, names) if on_gpu else {name: [] for name in names}
    sampler = DeviceMemorySampler(period=0.2) if on_gpu else None
    if sampler is not None:
        sampler.start()
    begin = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - begin
    if sampler is not None:
        sampler.stop()
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in h]
    keys = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
            "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
            "sampling/importance_sampling_ratio/max")  # fmt: skip
    seconds = timer.seconds if timer is not None else [wall / max(args.steps, 1)]
    plan = getattr(trainer, "rollout_plan", None)
    return {
        "status": "ok", "s_per_step": statistics.median(seconds[1:] or seconds), "s_all": seconds,
        "peak_allocated_GiB": torch.cuda.max_memory_allocated() / GIB if on_gpu else None,
        "device_peak_GiB": sampler.peak_bytes() / GIB if sampler is not None else None,
        "gpu_used_between_steps_GiB": statistics.median(timer.used_between_steps[1:] or timer.used_between_steps)
        if timer is not None else None,
        "sampling": {key.removeprefix("sampling/"): [h.get(key) for h in logs] for key in keys},
        "fp8_matmuls": {k: v[0] for k, v in matmul_summary(trainer.model).items()},
        "rollout_plan": plan.describe() if plan is not None else "TRL",
        **_phase_split(phases),
    }  # fmt: skip


# ---------------------------------------------------------------- driver


def all_runs(args) -> dict[str, tuple[list[str], int]]:
    """The measurements of `all`, by name: argv and timeout (seconds)."""
    steps = ["--length", str(args.length), "--steps", str(args.steps), "--preset", args.preset]
    runs = {"matmul": (["matmul", "--shapes", args.matmul_shapes], 300)}
    for weights in ("bf16", "per-channel", "per-block"):
        runs[f"rollout-{weights}"] = (["rollout", "--weights", weights, "--preset", args.preset], 420)
    runs["grpo-trl"] = (["grpo", "--trainer", "trl", *steps], 600)
    runs["grpo-bf16"] = (["grpo", "--weights", "bf16", *steps], 600)
    runs["grpo-per-channel"] = (["grpo", "--weights", "per-channel", *steps], 600)
    runs["grpo-per-channel-scaled_mm"] = (["grpo", "--weights", "per-channel", "--fp8-matmul", "scaled_mm", *steps],
                                          600)  # fmt: skip
    return runs


def cmd_all(args) -> None:
    runs = all_runs(args)
    unknown = sorted(set(args.only or []) - set(runs))
    if unknown:
        raise SystemExit(f"--only takes {sorted(runs)}, got {unknown}.")
    env = environment(_device(), ("vllm", "trl", "transformers", "peft"))
    rows = []
    for name, (argv, timeout) in runs.items():
        if args.only and name not in args.only:
            continue
        rows.append({"name": name, **child_row(__file__, argv, timeout)})
        print(json.dumps(rows[-1])[:2000], flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(summary(rows))


def summary(rows: list[dict]) -> str:
    """Rollout and GRPO rows, FP8 against bf16 and TRL; then the matmul rows."""
    table = []
    for r in rows:
        if r.get("what") == "rollout" and "tok_s" in r:
            gap = r.get("logp_gap", {})
            table.append([r["name"], f"{r['tok_s']:.0f} / {r['tok_s_lora']:.0f} tok/s (b2 {r['tok_s_b2_lora']:.0f})",
                          f"{r['vllm_weights_GiB']:.2f} GiB weights", gap.get("mean"), gap.get("max")])  # fmt: skip
        elif r.get("what") == "grpo_step" and r.get("status") == "ok":
            diff = r["sampling"].get("sampling_logp_difference/mean") or [None]
            table.append(
                [
                    r["name"],
                    f"{r['s_per_step']:.2f} s/step",
                    f"{r.get('device_peak_GiB') or 0:.1f} GiB peak",
                    statistics.median(d for d in diff if d is not None) if any(diff) else None,
                    max((m for m in r["sampling"].get("sampling_logp_difference/max", []) if m), default=None),
                ]
            )
        elif r.get("what") in ("rollout", "grpo_step"):
            table.append(
                [r.get("name"), r.get("status"), (r.get("error") or r.get("stderr") or "")[-200:], None, None]
            )
    out = markdown_table(["run", "speed", "memory", "logp gap mean", "logp gap max"], table)
    matmuls = [m for r in rows if r.get("what") == "matmul" for m in r.get("rows", []) if "ms" in m]
    lines = [[m["layer"], m["tokens"], m["provider"], m["ms"]["p50"], m["peak_GiB"], m["rel_error_vs_float64"]]
             for m in matmuls]  # fmt: skip
    return out + "\n\n" + markdown_table(["layer", "tokens", "provider", "ms p50", "peak GiB", "rel. error"], lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("matmul")
    p.add_argument("--shapes", default="qwen3-8b", help="A preset of trl_longctx.memory.PRESETS, or 'tiny'.")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p = sub.add_parser("rollout")
    p.add_argument("--weights", choices=WEIGHTS, required=True)
    p.add_argument("--preset", default="qwen3-1.7b", help="A preset of trl_longctx.memory.PRESETS, or 'tiny'.")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("grpo")
    p.add_argument("--trainer", choices=("ours", "trl"), default="ours")
    p.add_argument("--weights", choices=WEIGHTS, default="bf16")
    p.add_argument("--fp8-matmul", choices=FP8_MATMULS, default="auto", help="ours, FP8: the FP8 layers' matmul.")
    p.add_argument("--preset", default="qwen3-1.7b")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4)
    p = sub.add_parser("all")
    p.add_argument("--preset", default="qwen3-1.7b")
    p.add_argument("--matmul-shapes", default="qwen3-8b")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only", nargs="*", help="Measurements to run, by name (default: all; see all_runs).")
    p.add_argument("--out")
    args = parser.parse_args(argv)
    if args.cmd == "all":
        return cmd_all(args)
    row = {"matmul": cmd_matmul, "rollout": cmd_rollout, "grpo": cmd_grpo}[args.cmd](args)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
