"""`VLLM_STANDBY=1` on a plain `vllm.LLM(enable_sleep_mode=True)` (CUDA, vLLM 0.25-0.30): `sleep()` releases the KV
cache only.

Runs in a child process: the switch is read when vLLM loads its plugins (the `vllm.general_plugins` entry point of
the installed package), and one sleep-mode engine lives per process (the session's engine lives in this one).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_in_child

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _plain_engine_check(model_dir: str) -> None:
    os.environ["VLLM_STANDBY"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm
    from conftest import greedy_vllm

    import vllm_standby

    llm = vllm.LLM(
        model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=128, max_num_seqs=4,
        gpu_memory_utilization=0.2, enable_sleep_mode=True, seed=0,
    )  # fmt: skip
    assert vllm_standby.is_enabled(), "the entry point did not run: is vllm_standby installed (pip install)?"
    weight = llm.apply_model(lambda model: model)[0].model.layers[0].mlp.down_proj.weight
    checksum = weight.float().sum().item()
    before = greedy_vllm(llm)
    free, total = torch.cuda.mem_get_info()
    used_awake = total - free
    llm.sleep(level=1)
    free, total = torch.cuda.mem_get_info()
    released = used_awake - (total - free)
    # 0.2 of the GPU minus weights and activations is KV cache: several GiB, all of it released.
    assert released > 0.1 * total, f"sleep released {released / 2**30:.2f} GiB"
    # KV-only: the weights stay mapped and unchanged while asleep (stock level-1 sleep unmaps them).
    assert weight.float().sum().item() == checksum
    llm.wake_up()
    assert greedy_vllm(llm) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (KV-only sleep through vLLM's CuMem pool)")
def test_env_switch_gives_plain_llm_kv_only_sleep(tiny_qwen3_dir):
    from importlib.metadata import entry_points

    from vllm_standby import kv_standby_mechanism

    plugins = entry_points(group="vllm.general_plugins")
    if not any(plugin.value == "vllm_standby.plugin:register" for plugin in plugins):
        pytest.skip("vllm_standby is importable but not installed (pip install): vLLM finds no entry point to load")

    if kv_standby_mechanism() != "sleep-backend-patch":
        pytest.skip(
            f"KV-only standby here is {kv_standby_mechanism()!r}, not the sleep-backend patch: plain LLM.sleep() is "
            "vLLM's own (use LLM.release_kv_cache_memory, or vllm_standby.release_kv_cache)"
        )
    run_in_child(_plain_engine_check, str(tiny_qwen3_dir))
