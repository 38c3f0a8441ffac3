"""Fast start: kwargs logic (the caller's values win, every batch size is covered), the gc guard, a real engine."""

from __future__ import annotations

import gc

import pytest
from conftest import KV_CACHE_BYTES, LORA_RANK, VLLM_DTYPE

from vllm_standby import fast_start
from vllm_standby.fast_start import decode_capture_sizes, fast_start_kwargs, startup_gc_guard

# vLLM's default capture sizes for a given largest size (`VllmConfig._set_cudagraph_sizes`, v0.25.0 and v0.31.0).
STOCK_PATTERN = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]


def _stock_sizes(max_num_seqs: int) -> list[int]:
    top = min(2 * max_num_seqs, 512)
    return [s for s in STOCK_PATTERN if s <= top]


def _padded(sizes: list[int], batch: int) -> int | None:
    """The size vLLM pads ``batch`` to (None: no graph, the batch runs eagerly)."""
    return next((s for s in sizes if s >= batch), None)


@pytest.fixture
def on_cuda(monkeypatch):
    """Make the kwargs logic take the CUDA branch (combo kernels on), whatever this machine is."""
    monkeypatch.setattr(fast_start, "_combo_kernels_by_default", lambda: True)


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3, 7, 8, 9, 17, 64, 100, 255, 256, 257, 300, 512, 1000])
def test_capture_sizes_cover_every_batch_and_pad_no_more_than_stock(max_num_seqs):
    sizes = decode_capture_sizes(max_num_seqs)
    top = min(max_num_seqs, 512)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == top
    stock = _stock_sizes(max_num_seqs)
    for batch in range(1, top + 1):
        ours = _padded(sizes, batch)
        assert ours is not None, f"batch {batch} has no graph"
        assert ours <= _padded(stock, batch), f"batch {batch} pads to {ours}, stock vLLM to {_padded(stock, batch)}"
    assert len(sizes) <= len(stock)


def test_defaults(on_cuda):
    kwargs = fast_start_kwargs(max_num_seqs=16, model="m", dtype="bfloat16")
    assert kwargs == {
        "model": "m",
        "dtype": "bfloat16",
        "max_num_seqs": 16,
        "compilation_config": {
            "cudagraph_capture_sizes": [1, 2, 4, 8, 16],
            "cudagraph_mode": "FULL_DECODE_ONLY",
            "inductor_compile_config": {"combo_kernels": True, "benchmark_combo_kernel": False},
        },
    }


def test_no_combo_kernel_options_where_vllm_sets_none(monkeypatch):
    monkeypatch.setattr(fast_start, "_combo_kernels_by_default", lambda: False)
    assert "inductor_compile_config" not in fast_start_kwargs(max_num_seqs=4)["compilation_config"]


def test_user_values_win(on_cuda):
    user = {
        "cudagraph_mode": "PIECEWISE",
        "cudagraph_capture_sizes": [1, 3],
        "inductor_compile_config": {"combo_kernels": False, "max_autotune": False},
        "mode": 3,
    }
    snapshot = {
        k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in user.items()
    }
    kwargs = fast_start_kwargs(max_num_seqs=8, compilation_config=user, seed=3)
    assert kwargs["compilation_config"] == snapshot
    assert kwargs["compilation_config"] is not user and user == snapshot, "the caller's dict was changed"
    assert kwargs["seed"] == 3 and kwargs["max_num_seqs"] == 8


def test_ours_added_beside_the_callers_keys(on_cuda):
    config = fast_start_kwargs(
        max_num_seqs=4, compilation_config={"mode": 3, "inductor_compile_config": {"dce": True}}
    )["compilation_config"]
    assert config["mode"] == 3 and config["cudagraph_mode"] == "FULL_DECODE_ONLY"
    assert config["cudagraph_capture_sizes"] == [1, 2, 4]
    assert config["inductor_compile_config"] == {"dce": True, "combo_kernels": True, "benchmark_combo_kernel": False}


def test_caller_max_capture_size_leaves_sizes_to_vllm(on_cuda):
    config = fast_start_kwargs(max_num_seqs=4, compilation_config={"max_cudagraph_capture_size": 16})[
        "compilation_config"
    ]
    assert "cudagraph_capture_sizes" not in config and config["max_cudagraph_capture_size"] == 16


def test_one_combo_key_from_the_caller_keeps_both_theirs(on_cuda):
    config = fast_start_kwargs(
        max_num_seqs=4, compilation_config={"inductor_compile_config": {"combo_kernels": True}}
    )["compilation_config"]
    assert config["inductor_compile_config"] == {"combo_kernels": True}


def test_int_compilation_config_is_the_mode(on_cuda):
    assert fast_start_kwargs(max_num_seqs=2, compilation_config=0)["compilation_config"]["mode"] == 0


def test_optimization_level_keeps_its_graph_mode(on_cuda):
    config = fast_start_kwargs(max_num_seqs=2, optimization_level=1)["compilation_config"]
    assert "cudagraph_mode" not in config and config["cudagraph_capture_sizes"] == [1, 2]


def test_compilation_config_object_is_used_as_is():
    from vllm.config import CompilationConfig

    config = CompilationConfig()
    assert fast_start_kwargs(max_num_seqs=2, compilation_config=config)["compilation_config"] is config


def test_enforce_eager_adds_nothing():
    assert fast_start_kwargs(max_num_seqs=2, enforce_eager=True) == {"enforce_eager": True, "max_num_seqs": 2}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "max_num_seqs"),
        ({"max_num_seqs": None}, "max_num_seqs"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_seqs": -3}, "max_num_seqs"),
        ({"max_num_seqs": 2.0}, "max_num_seqs"),
        ({"max_num_seqs": True}, "max_num_seqs"),
        ({"max_num_seqs": "8"}, "max_num_seqs"),
        ({"max_num_seqs": 4, "compilation_config": "{}"}, "compilation_config"),
        ({"max_num_seqs": 4, "compilation_config": {"inductor_compile_config": [1]}}, "inductor_compile_config"),
        ({"max_num_seqs": 4, "speculative_config": {"num_speculative_tokens": 2}}, "speculative_config"),
    ],
)
def test_invalid_input_names_the_field(kwargs, field, on_cuda):
    with pytest.raises(ValueError, match=field):
        fast_start_kwargs(**kwargs)


def test_decode_capture_sizes_rejects_bad_max_num_seqs():
    with pytest.raises(ValueError, match="max_num_seqs"):
        decode_capture_sizes(0)


def test_installed_vllm_reads_every_key(on_cuda):
    """Contract: `LLM` silently drops unknown compilation_config keys, so each of ours must be a field upstream."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode

    ours = fast_start_kwargs(max_num_seqs=24)["compilation_config"]
    assert set(ours) <= set(CompilationConfig.__dataclass_fields__)
    config = CompilationConfig(**ours)
    assert config.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    assert config.cudagraph_capture_sizes == [1, 2, 4, 8, 16, 24]
    assert {"combo_kernels": True, "benchmark_combo_kernel": False}.items() <= config.inductor_compile_config.items()


@pytest.fixture
def clean_gc():
    """Start unfrozen and enabled (an in-process engine freezes the heap); put the state back afterwards."""
    was_frozen, was_enabled = gc.get_freeze_count() > 0, gc.isenabled()
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    if was_frozen:
        gc.freeze()
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


class _Cycle:
    def __init__(self):
        self.me = self


def test_gc_guard_no_automatic_collection(clean_gc):
    seen = []

    def callback(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(callback)
    try:
        with startup_gc_guard():
            assert not gc.isenabled() and gc.get_freeze_count() > 0
            garbage = [_Cycle() for _ in range(50_000)]
            del garbage
            assert not seen, f"automatic collections ran in the guard: generations {seen}"
            gc.collect()  # explicit collections still run (vLLM's own)
            assert seen == [2]
    finally:
        gc.callbacks.remove(callback)
    assert gc.isenabled() and gc.get_freeze_count() == 0, "the guard's freeze was not undone"


def test_gc_guard_keeps_a_freeze_made_meanwhile(clean_gc):
    with startup_gc_guard():
        keep = [_Cycle() for _ in range(10)]
        gc.unfreeze()  # what vLLM does: unfreeze, collect, then freeze the whole heap at the end of start-up
        gc.freeze()
    assert gc.get_freeze_count() > 0 and keep


def test_gc_guard_leaves_an_earlier_freeze_and_disabled_gc(clean_gc):
    gc.freeze()
    before = gc.get_freeze_count()
    gc.disable()
    with startup_gc_guard():
        pass
    # Not unfrozen (0) and nothing frozen on top; frozen objects freed by refcount meanwhile leave the count.
    assert not gc.isenabled() and 0.99 * before <= gc.get_freeze_count() <= before


def test_gc_guard_restores_on_error(clean_gc):
    with pytest.raises(RuntimeError), startup_gc_guard():
        raise RuntimeError("engine failed to start")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_standby_llm_fast_start_needs_max_num_seqs(tiny_qwen3_dir):
    import vllm_standby

    with pytest.raises(ValueError, match="max_num_seqs"):
        vllm_standby.StandbyLLM(str(tiny_qwen3_dir), fast_start=True)
    assert gc.isenabled()


# One engine per child process: a second in-process engine beside the session's `vllm_llm` made the tests that use
# the latter fail (vLLM 0.31, CPU), and on CUDA sleep mode's CuMem allocator is a process-wide singleton. On the CPU
# platform both engines get the same config (it drops CUDA graphs and, with LoRA, compilation): there this checks that
# vLLM takes the kwargs and the gc guard; on CUDA, also the graph mode and sizes.
_CHILD = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
from conftest import greedy_vllm
import vllm_standby
spec = json.loads(sys.argv[2])
llm = vllm_standby.StandbyLLM(spec["model"], fast_start=spec["fast_start"], **spec["engine"])
config = llm.llm_engine.vllm_config.compilation_config
result = {"gc_enabled": gc.isenabled(), "tokens": greedy_vllm(llm), "mode": str(config.cudagraph_mode),
          "sizes": config.cudagraph_capture_sizes}
llm.standby()
result["tokens_after_standby"] = greedy_vllm(llm)
print("RESULT " + json.dumps(result), flush=True)
"""


def _engine_in_child(model: str, fast_start: bool) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    # The session engine's settings, but compiled, with graphs where the platform has them (no enforce_eager).
    engine = {"dtype": VLLM_DTYPE, "max_model_len": 128, "max_num_seqs": 4, "kv_cache_memory_bytes": KV_CACHE_BYTES,
              "seed": 0, "enable_lora": True, "max_lora_rank": LORA_RANK, "max_loras": 1}  # fmt: skip
    spec = json.dumps({"model": model, "fast_start": fast_start, "engine": engine})
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), spec], capture_output=True,
                          text=True, timeout=900, env=env)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
def test_fast_start_engine_generates_as_stock(tiny_qwen3_dir):
    import torch

    stock = _engine_in_child(str(tiny_qwen3_dir), fast_start=False)
    fast = _engine_in_child(str(tiny_qwen3_dir), fast_start=True)
    assert fast["gc_enabled"] and stock["gc_enabled"]
    assert fast["tokens"] == stock["tokens"] == fast["tokens_after_standby"]
    if torch.cuda.is_available():
        assert fast["mode"] == "FULL_DECODE_ONLY" and fast["sizes"] == decode_capture_sizes(4)
