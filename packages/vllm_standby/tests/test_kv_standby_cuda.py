"""KV-only standby of a `StandbyLLM` on CUDA, through whichever mechanism the installed vLLM has.

vLLM 0.25-0.30: our KV-only sleep-mode backend ("sleep-backend-patch"); 0.31 and later: vLLM's own
`LLM.release_kv_cache_memory` ("vllm-api"). Either way free GPU memory rises by about the KV cache's size, the
weights stay mapped, and greedy generation after the restore equals generation before it. Runs in a child process:
one sleep-mode engine lives per process (its CuMem allocator is a process-wide singleton), and the session's engine
lives in this one.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_in_child

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _expected_mechanism() -> str:
    from packaging.version import Version

    from vllm_standby._version import installed_vllm_version

    return "vllm-api" if Version(installed_vllm_version().base_version) >= Version("0.31") else "sleep-backend-patch"


def _sleep_backend_name(worker) -> str | None:
    """The class of the sleep-mode backend the worker resolved (None: it never needed one)."""
    backend = getattr(worker, "_sleep_mode_backend", None)
    return None if backend is None else type(backend).__name__


def _free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def _cuda_standby_check(model_dir: str, expected: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from conftest import greedy_vllm

    import vllm_standby

    llm = vllm_standby.StandbyLLM(
        model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=128, max_num_seqs=4,
        gpu_memory_utilization=0.2, seed=0,
    )  # fmt: skip
    assert llm.kv_standby_mechanism == vllm_standby.kv_standby_mechanism() == expected
    weight = llm.apply_model(lambda model: model)[0].model.layers[0].mlp.down_proj.weight
    checksum = weight.float().sum().item()
    before = greedy_vllm(llm)
    held = llm.kv_cache_nbytes()
    total = torch.cuda.mem_get_info()[1]
    # 0.2 of the GPU minus a tiny model's weights and activations is KV cache: several GiB.
    assert held > 0.1 * total, f"KV cache {held / 2**30:.2f} GiB of {total / 2**30:.0f} GiB"

    awake = _free_bytes()
    assert llm.standby() == held and llm.kv_cache_nbytes() == 0
    asleep = _free_bytes()
    released = asleep - awake
    assert released >= 0.95 * held, f"free memory rose {released / 2**30:.2f} GiB, KV cache {held / 2**30:.2f} GiB"
    assert weight.float().sum().item() == checksum, "weights changed while the KV cache was released"

    # Which mechanism ran: our backend was chosen by the worker, or vLLM discarded the KV cache's tag only.
    backends = llm.collective_rpc(_sleep_backend_name)
    if expected == "sleep-backend-patch":
        assert backends == ["KVOnlySleepBackend"], backends
    else:
        assert backends != ["KVOnlySleepBackend"], backends
        executor = llm.llm_engine.engine_core.engine_core.model_executor
        assert set(executor.sleeping_tags) == {"kv_cache"}, executor.sleeping_tags

    assert llm.resume() == held
    restored = asleep - _free_bytes()
    assert restored >= 0.95 * held, f"free memory fell {restored / 2**30:.2f} GiB, KV cache {held / 2**30:.2f} GiB"
    assert not llm.llm_engine.is_sleeping()
    assert greedy_vllm(llm) == before
    llm.standby()
    assert greedy_vllm(llm) == before  # generation resumes by itself


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (KV-only standby through vLLM's CuMem pool)")
def test_standby_llm_releases_and_restores_kv_cache_on_cuda(tiny_qwen3_dir):
    run_in_child(_cuda_standby_check, str(tiny_qwen3_dir), _expected_mechanism())
