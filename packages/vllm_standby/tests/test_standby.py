"""StandbyLLM: the KV cache is freed for real and comes back; generations do not change; no memory creeps."""

from __future__ import annotations

import os
import time

import pytest
from conftest import KV_CACHE_BYTES, PROMPTS, greedy_vllm

pytestmark = pytest.mark.slow


def _rss_bytes() -> int:
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS read from /proc/self/statm (Linux only)")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _used_bytes() -> int:
    """Memory the KV cache lives in: resident host memory on the CPU platform, used GPU memory on CUDA."""
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return _rss_bytes()
    free, total = torch.cuda.mem_get_info()
    return total - free


@pytest.fixture
def standby_llm(vllm_llm):
    import vllm_standby

    if not vllm_standby.kv_standby_supported():
        pytest.skip("KV-only standby is not implemented on this vLLM platform/version")
    vllm_llm.resume()
    yield vllm_llm
    vllm_llm.resume()


def _touch_kv_cache(worker) -> int:
    """Write every byte of the worker's KV cache, so that all of it is resident (on CPU pages come back lazily)."""
    from vllm_standby import _worker

    storages = _worker._kv_cache_storages(worker)
    for storage in storages:
        _worker.zero_storage(storage)
    return len(storages)


def test_standby_frees_kv_cache_for_real(standby_llm):
    expected = greedy_vllm(standby_llm)
    held = standby_llm.kv_cache_nbytes()
    assert sum(standby_llm.collective_rpc(_touch_kv_cache)) > 0
    # CUDA: vLLM's CuMem pool rounds each allocation up to the driver's granularity (seen: +3% at 64 MiB).
    assert 0.9 * KV_CACHE_BYTES <= held <= 1.05 * KV_CACHE_BYTES
    used = _used_bytes()
    assert standby_llm.standby() == held
    assert standby_llm.is_standby and standby_llm.kv_cache_nbytes() == 0
    assert standby_llm.standby() == 0  # idempotent
    assert used - _used_bytes() >= 0.9 * held, "releasing the KV cache did not lower the memory in use"
    assert greedy_vllm(standby_llm) == expected  # generation resumes by itself
    assert not standby_llm.is_standby and standby_llm.kv_cache_nbytes() == held


def test_explicit_resume_restores_same_size(standby_llm):
    held = standby_llm.kv_cache_nbytes()
    standby_llm.standby()
    assert standby_llm.resume() == held
    assert standby_llm.resume() == 0
    assert standby_llm.kv_cache_nbytes() == held


def test_standby_refuses_unfinished_requests(standby_llm):
    from vllm import SamplingParams

    standby_llm.llm_engine.add_request("pending", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=2))
    try:
        with pytest.raises(RuntimeError, match="unfinished"):
            standby_llm.standby()
    finally:
        standby_llm.llm_engine.abort_request(["pending"])
    assert not standby_llm.is_standby


def test_100_cycles_no_rss_growth_same_generations(standby_llm):
    expected = greedy_vllm(standby_llm)
    standby_llm.standby()
    greedy_vllm(standby_llm)  # warm up allocator pools at the post-standby steady state
    rss_start, used_start = _rss_bytes(), _used_bytes()
    start = time.perf_counter()
    for cycle in range(100):
        standby_llm.standby()
        assert standby_llm.is_standby
        got = greedy_vllm(standby_llm, prompts=PROMPTS[:1], max_tokens=4)
        assert got == [expected[0][:4]], f"cycle {cycle}: generation changed after standby/resume"
    assert greedy_vllm(standby_llm) == expected
    growth = (_rss_bytes() - rss_start) / rss_start
    assert growth < 0.01, f"RSS grew {growth:.2%} over 100 standby/resume cycles"
    used_growth = (_used_bytes() - used_start) / used_start
    assert used_growth < 0.01, f"memory in use grew {used_growth:.2%} over 100 standby/resume cycles"
    print(f"100 cycles: {time.perf_counter() - start:.1f} s, RSS growth {growth:.3%}, in use {used_growth:.3%}")


def _pending(llm, tag: str) -> None:
    """Three unfinished sequences, as a failed rollout leaves them: one request, and one with two parallel samples."""
    from vllm import SamplingParams

    llm.llm_engine.add_request(f"{tag}-a", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=4))
    llm.llm_engine.add_request(f"{tag}-b", {"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=4, n=2))
    assert llm.llm_engine.has_unfinished_requests()


def _core_scheduler(llm):
    # In-process engine (conftest): the client holds the EngineCore, whose scheduler the abort must reach too.
    return llm.llm_engine.engine_core.engine_core.scheduler


def test_abort_unfinished_requests_aborts_front_end_and_core(standby_llm):
    import vllm_standby

    _pending(standby_llm, "abort")
    assert _core_scheduler(standby_llm).has_unfinished_requests()
    assert vllm_standby.abort_unfinished_requests(standby_llm) == 3
    assert not standby_llm.llm_engine.has_unfinished_requests()
    assert not standby_llm.llm_engine.output_processor.parent_requests
    assert not _core_scheduler(standby_llm).has_unfinished_requests()
    assert vllm_standby.abort_unfinished_requests(standby_llm) == 0


def test_release_after_a_failed_rollout_aborts_then_releases(standby_llm):
    import vllm_standby

    expected = greedy_vllm(standby_llm)
    held = standby_llm.kv_cache_nbytes()
    _pending(standby_llm, "failed")
    with pytest.raises(RuntimeError, match="abort_unfinished=True"):
        vllm_standby.release_kv_cache(standby_llm)
    assert vllm_standby.release_kv_cache(standby_llm, abort_unfinished=True) == held
    assert standby_llm.kv_cache_nbytes() == 0 and not standby_llm.llm_engine.has_unfinished_requests()
    assert vllm_standby.restore_kv_cache(standby_llm) == held
    assert greedy_vllm(standby_llm) == expected  # the run goes on: same greedy tokens as before the failure


def test_drain_leaves_the_in_process_core_idle(standby_llm):
    """What `LLM.release_kv_cache_memory` checks before it discards (no request, finished or not, and no queued batch):
    met after a rollout and after aborted requests; a core still holding work when the steps run out is refused."""
    from vllm_standby.kv_cache import abort_unfinished_requests, drain_inproc_engine_core

    core = standby_llm.llm_engine.engine_core.engine_core
    greedy_vllm(standby_llm)
    assert core.scheduler.has_requests(), "finished requests' ids wait for the next step"
    with pytest.raises(RuntimeError, match="after 0 empty steps"):
        drain_inproc_engine_core(standby_llm, max_steps=0)
    assert drain_inproc_engine_core(standby_llm) >= 1
    assert not core.scheduler.has_requests() and not core.batch_queue
    _pending(standby_llm, "drain")
    abort_unfinished_requests(standby_llm)
    drain_inproc_engine_core(standby_llm)
    assert not core.scheduler.has_requests() and not core.batch_queue
    assert drain_inproc_engine_core(standby_llm) == 0


def test_vllm_api_path_reaches_vllms_release_and_recovers(standby_llm, monkeypatch):
    """The "vllm-api" path on the CPU build, as far as it runs there: after a rollout and aborted requests, the pause
    meets `LLM.release_kv_cache_memory`'s precondition (vLLM gets to its discard, which the CPU worker refuses), and
    the engine is running again afterwards. The path is selected by hand: on CPU `kv_standby_mechanism()` is
    "cpu-worker" (and the CPU engine has no sleep mode, which the CUDA paths check)."""
    from vllm_standby import kv_cache

    if kv_cache.kv_standby_mechanism() != "cpu-worker":
        pytest.skip("on CUDA the discard succeeds: tests/test_kv_standby_cuda.py covers the whole path there")
    from vllm_standby.kv_cache import abort_unfinished_requests, release_kv_cache

    expected = greedy_vllm(standby_llm)
    _pending(standby_llm, "api")
    assert abort_unfinished_requests(standby_llm) == 3
    monkeypatch.setattr(kv_cache, "_mechanism_for", lambda llm: "vllm-api")
    with pytest.raises(RuntimeError, match="not supported on CPU"):
        release_kv_cache(standby_llm)
    assert not standby_llm.llm_engine.is_sleeping(), "the failed release left the engine paused"
    monkeypatch.undo()
    assert greedy_vllm(standby_llm) == expected
