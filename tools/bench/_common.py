"""Shared helpers of the benchmark scripts: timing, peak memory, environment record, tables.

Timing follows the usual GPU method: warm up, then time each call with CUDA events (wall clock on CPU), and
report the median with the 20th and 80th percentiles. Memory is the peak allocated above what was allocated
before the call (the inputs), from the caching allocator's statistics.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

GIB = 2**30


def _percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: list[float]) -> dict[str, float]:
    """p20 / p50 / p80 of a list of samples."""
    s = sorted(samples)
    return {"p20": _percentile(s, 0.2), "p50": _percentile(s, 0.5), "p80": _percentile(s, 0.8), "n": len(s)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    min_iters: int = 3,
    max_iters: int = 10,
    target_s: float = 1.5,
) -> dict[str, float]:
    """Milliseconds per call of ``fn``: ``warmup`` calls, then enough timed calls to last about ``target_s``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    iters = max_iters
    for i in range(max_iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if i == 0:
            iters = max(min_iters, min(max_iters, int(target_s * 1e3 / max(samples[0], 1e-3))))
        if len(samples) >= iters:
            break
    return summarize(samples)


def peak_gib_above_current(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated memory during ``fn()`` above what was allocated before it, in GiB (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


def timed_steps(step: Callable[[], Any], device: torch.device, count: int) -> tuple[dict[str, Any], Any]:
    """`count` calls of a training `step`, each timed on its own (synchronized on CUDA), the peak memory counted from
    the first: the row fields `s` (median of the calls after the first, or the first when it is the only one),
    `first_s`, `s_all`, `GiB` (peak allocated; `None` off CUDA), and the last call's result. Raises what `step`
    raises (an OOM included: `is_oom` tells)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, result = [], None
    for _ in range(count):
        _sync(device)
        start = time.perf_counter()
        result = step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:] or seconds
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"s": sorted(timed)[len(timed) // 2], "first_s": seconds[0], "s_all": seconds, "GiB": peak}, result


def last_pass_sizes(logprob_pass) -> tuple[int | None, int]:
    """`(sequences per decoder pass, MLP tiles)` of a `trl_longctx.logprob_pass.LogProbPass`'s last pass, or
    `(None, 1)` when it ran none."""
    if not logprob_pass.used:
        return None, 1
    used = logprob_pass.used[-1]
    return used.grpo_mini_batch, used.tiled_mlp_chunks


def cap_device_memory(device: torch.device, gib: float) -> float:
    """Cap this process's allocations on `device` at `gib` GiB (`torch.cuda.set_per_process_memory_fraction`), to
    stand for a smaller card; returns the cap in bytes."""
    index = device.index if device.index is not None else torch.cuda.current_device()  # the call needs an index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), index)
    return gib * GIB


def step_status(**values: float | None) -> str:
    """A timed step's row status: `"ok"`, or `"non-finite (name=value, ...)"` naming the values (mean log-prob, aux
    loss, ...) that are NaN or infinite, so that a step which ran but computed garbage is never counted as trained."""
    bad = [f"{name}={value}" for name, value in values.items() if value is not None and not math.isfinite(value)]
    return f"non-finite ({', '.join(bad)})" if bad else "ok"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """The checkout's commit, or $BENCH_COMMIT where the tree travelled without .git (the lent GPU)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment(device: torch.device, extra_dists: tuple[str, ...] = ()) -> dict[str, Any]:
    """Device, date, versions and commit for the JSON header of a benchmark."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
    }
    for dist in ("triton", *extra_dists):
        info[dist] = _version(dist)
    return info


def row_recorder(result: dict[str, Any], out) -> Callable[[dict[str, Any]], None]:
    """A function that appends a row to `result["rows"]`, prints it as a JSON line and, when `out` (a `Path`) is
    given, rewrites `result` there: written after every row, so a run cut short keeps what it measured."""

    def record(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))

    return record


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class ChildRun:
    """What a benchmark's child process left: its JSON rows (stdout lines starting with "{"), in order, and how it
    ended. After a timeout the rows are those printed before it was stopped."""

    rows: list[dict[str, Any]]
    returncode: int | None
    timed_out: bool
    stderr: str


def run_json_child(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> ChildRun:
    """Run `cmd` (a measurement in its own process) for at most `timeout` seconds and collect its JSON rows."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        return ChildRun(_json_rows(_text(exc.stdout)), None, True, _text(exc.stderr))
    return ChildRun(_json_rows(proc.stdout), proc.returncode, False, proc.stderr)


def child_row(script: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run `python script argv...` (one subcommand of a benchmark) in a fresh process; its last JSON stdout line is
    its row, with `args`. A child that times out gives the rows it printed (`partial`), a failing one its stderr."""
    print("$", " ".join(argv), flush=True)
    run = run_json_child([sys.executable, script, *argv], timeout)
    if run.timed_out:
        # Keep what the child printed before it was stopped (one JSON line per finished point).
        return {"what": argv[0], "args": argv, "status": f"timeout after {timeout} s", "partial": run.rows}
    if run.returncode != 0 or not run.rows:
        return {"what": argv[0], "args": argv, "status": f"exit {run.returncode}", "stderr": run.stderr[-3000:]}
    return {**run.rows[-1], "args": argv}


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _json_rows(stdout: str) -> list[dict[str, Any]]:
    """The JSON object lines of `stdout`; other lines starting with "{" (e.g. the Trainer's printed log dicts, Python
    reprs with single quotes) are not rows."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
