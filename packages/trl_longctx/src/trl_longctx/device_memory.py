"""The GPU memory a run really holds: the device's memory in use, sampled in the background.

torch's allocator statistics (`max_memory_allocated`) cannot say it for a run with a colocated vLLM on CUDA: vLLM's
sleep-mode pool is allocated through torch, and a KV cache released by unmapping its pages (KV-only standby) stays
"allocated" there, so the allocator's peak adds the released cache to the trainer's own peak and can exceed the card.
The device's own figure (`torch.cuda.mem_get_info`: total less free) counts what is mapped, whoever allocated it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["DeviceMemorySampler", "cuda_used_bytes"]


def cuda_used_bytes(device: int | None = None) -> int:
    """Memory in use on a CUDA device (default: the current one), bytes: all processes on it, one per device in a
    training run."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return total - free


class DeviceMemorySampler:
    """Samples `read()` every `period` seconds on a daemon thread and keeps the largest value.

    Peaks shorter than `period` that the caching allocator returns to the device within it are missed; memory the
    allocator keeps cached (its usual behaviour) is seen at the next sample.

    Args:
        read: Returns the bytes in use now (default: `cuda_used_bytes` of the device current when the sampler is
            built: the sampling thread has a current device of its own).
        period: Seconds between samples.

    Example:
        >>> sampler = DeviceMemorySampler(read=lambda: 42, period=0.01)
        >>> sampler.start(); sampler.stop(); sampler.peak_bytes()
        42
    """

    def __init__(self, read: Callable[[], int] | None = None, period: float = 1.0):
        if read is None:
            import torch

            device = torch.cuda.current_device()
            read = lambda: cuda_used_bytes(device)  # noqa: E731
        self._read, self._period = read, period
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Take a first sample and start sampling (again, after `stop`)."""
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="device-memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, after a last sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()

    def peak_bytes(self) -> int:
        """The largest sample so far, now included."""
        self._sample()
        return self._peak

    def _sample(self) -> None:
        self._peak = max(self._peak, self._read())

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()
