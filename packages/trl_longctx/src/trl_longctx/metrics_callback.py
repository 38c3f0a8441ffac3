"""A `TrainerCallback` that writes `metrics.jsonl`, `summary.json` and `reward.png` into a run folder."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .device_memory import DeviceMemorySampler


def peak_memory_mb(sampler: DeviceMemorySampler | None = None) -> float:
    """Peak memory of this run in MiB: on a GPU, the device's memory in use at its peak (`sampler`'s, see
    `trl_longctx.device_memory`; without one, torch's allocator peak); on CPU, the resident set peak."""
    if torch.cuda.is_available():
        if sampler is not None:
            return sampler.peak_bytes() / 2**20
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_memory_gib() -> float:
    """Resident memory of this process and all its descendants (e.g. vLLM engine processes) in GiB, now.

    Pages shared between the processes count once per process, so with several processes this is an upper bound.
    """
    import psutil  # a dependency of accelerate

    process = psutil.Process()
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:  # exited since it was listed
            continue
    return total / 2**30


def write_json_atomic(path: Path, payload) -> None:
    """Write JSON to `path` through a temporary file and a rename, so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFilesCallback(TrainerCallback):
    """Append one JSON object per logged step to `metrics.jsonl`; at the end, write `summary.json` and `reward.png`.

    Each line holds `step`, `reward`, `loss`, `peak_memory_mb` (on a GPU the device's memory in use at its peak so
    far, sampled every second; on CPU the resident set peak), `allocator_peak_mb` (torch's `max_memory_allocated`
    on a GPU, which counts a colocated vLLM's released KV cache as allocated), `rss_gib` (resident memory now, see
    `resident_memory_gib`), `elapsed_s` and every other logged scalar. No file is created before the first logged
    step, so a run that fails before it leaves no empty `metrics.jsonl`.

    Args:
        run_dir: Folder of the run's files (created at the first logged step if missing).
        extra_summary: Values copied into `summary.json` (e.g. the rollout backend).
    """

    def __init__(self, run_dir: str | os.PathLike, extra_summary: dict | None = None):
        self.run_dir = Path(run_dir)
        self.extra_summary = dict(extra_summary or {})
        self.records: list[dict] = []
        self._start = time.perf_counter()
        self._sampler: DeviceMemorySampler | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        path = self.run_dir / "metrics.jsonl"
        # A fresh run starts a fresh file. A run resumed at step N (state loaded before this hook) keeps the records
        # of steps <= N and drops later ones, which the crashed run logged after its last checkpoint. A file that
        # does not exist yet is left to the first logged step.
        kept = []
        if state.global_step > 0 and path.exists():
            kept = [r for r in _read_records(path) if r.get("step", 0) <= state.global_step]
        if state.is_world_process_zero and path.exists():
            write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.records = kept
        self._start = time.perf_counter()
        if torch.cuda.is_available() and self._sampler is None:
            self._sampler = DeviceMemorySampler()
            self._sampler.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        record = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
        if torch.cuda.is_available():
            record["allocator_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record.update(
            step=state.global_step,
            peak_memory_mb=peak_memory_mb(self._sampler),
            rss_gib=resident_memory_gib(),
            elapsed_s=time.perf_counter() - self._start,
        )
        self.records.append(record)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        peak = peak_memory_mb(self._sampler)
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if not state.is_world_process_zero:
            return
        rewards = [r["reward"] for r in self.records]
        fifth = max(1, len(rewards) // 5)
        summary = {
            **self.extra_summary,
            "steps": state.global_step,
            "logged_steps": len(rewards),
            "train_seconds": time.perf_counter() - self._start,
            "peak_memory_mb": peak,
            "reward_first_fifth": sum(rewards[:fifth]) / fifth if rewards else None,
            "reward_last_fifth": sum(rewards[-fifth:]) / fifth if rewards else None,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "summary.json", summary)
        if rewards:
            from .plotting import plot_reward_curve

            plot_reward_curve(self.records, self.run_dir / "reward.png")


def _read_records(path: Path) -> list[dict]:
    """The JSON records of `metrics.jsonl`, without a last line that a killed run left half-written."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
