"""`DeviceMemorySampler`: the peak of the samples a background thread takes (the reading is injected on CPU)."""

import threading
import time

from trl_longctx.device_memory import DeviceMemorySampler


def test_sampler_keeps_the_largest_sample_taken_in_the_background():
    values = iter([5, 7, 30, 9] + [3] * 10_000)
    seen = threading.Event()
    lock = threading.Lock()

    def read():
        with lock:
            value = next(values)
        if value == 9:
            seen.set()
        return value

    sampler = DeviceMemorySampler(read=read, period=0.001)
    sampler.start()  # first sample: 5, taken at once
    assert seen.wait(5), "the background thread did not sample"
    sampler.stop()
    assert sampler.peak_bytes() == 30  # seen between log steps, kept after the memory went down


def test_sampler_counts_the_present_value_and_restarts():
    current = {"bytes": 10}
    sampler = DeviceMemorySampler(read=lambda: current["bytes"], period=60)
    sampler.start()
    current["bytes"] = 25
    assert sampler.peak_bytes() == 25  # asking samples now, between the slow periodic samples
    sampler.stop()
    current["bytes"] = 40
    sampler.start()
    time.sleep(0.01)
    sampler.stop()
    assert sampler.peak_bytes() == 40
