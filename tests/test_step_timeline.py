"""`tools/bench/step_timeline.py` on synthetic allocator traces (CPU): components by phase and lifetime, totals, peak,
the PNG."""

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_step_timeline", Path(__file__).resolve().parents[1] / "tools" / "bench" / "step_timeline.py"
)
step_timeline = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = step_timeline
_SPEC.loader.exec_module(step_timeline)
COMPONENTS, GIB = step_timeline.COMPONENTS, step_timeline.GIB
plot_memory_timelines, record_step, step_components = (
    step_timeline.plot_memory_timelines,
    step_timeline.record_step,
    step_timeline.step_components,
)

RESIDENT, SAVED, FORWARD, LOGPROB, BACKWARD, OPTIMIZER = COMPONENTS


def trace(*items):
    """Events from ("alloc"|"free", addr, GiB) and ("mark", addr) tuples, in the snapshot's format."""
    events = []
    for kind, addr, *size in items:
        if kind == "mark":
            events += [{"action": "alloc", "addr": addr, "size": 512, "marker": True},
                       {"action": "free_completed", "addr": addr, "size": 512, "marker": False}]  # fmt: skip
        else:
            action = "alloc" if kind == "alloc" else "free_completed"
            events.append({"action": action, "addr": addr, "size": int(size[0] * GIB) if size else 0, "marker": False})
    return events


def a_step():
    return {
        "resident_bytes": 10 * GIB,
        "peak_bytes": int(16 * GIB),
        "phases": ["forward", "log-probs", "backward", "optimizer"],
        "events": trace(
            ("mark", 1),
            ("alloc", 100, 2),  # a checkpointed layer input: lives into the backward
            ("alloc", 101, 1),  # a forward temporary
            ("free", 101),
            ("mark", 2),
            ("alloc", 102, 3),  # log-prob chunk
            ("free", 102),
            ("mark", 3),
            ("free", 7, 1),  # a resident block (last step's gradient) freed during the step
            ("alloc", 103, 5),  # recompute
            ("free", 100),
            ("free", 103),
            ("mark", 4),
            ("alloc", 104, 0.5),  # optimizer temporary, still alive at the end
        ),
    }


def test_components_follow_phase_and_lifetime():
    series = step_components(a_step())
    gib = series["GiB"]
    assert max(gib[SAVED]) == pytest.approx(2) and max(gib[FORWARD]) == pytest.approx(1)
    assert max(gib[LOGPROB]) == pytest.approx(3) and max(gib[BACKWARD]) == pytest.approx(5)
    assert gib[OPTIMIZER][-1] == pytest.approx(0.5)
    assert gib[RESIDENT][0] == pytest.approx(10) and gib[RESIDENT][-1] == pytest.approx(9)
    # Peak: resident 9 + saved 2 + recompute 5, during the backward (the log-prob step reached 10 + 2 + 3).
    assert series["peak_GiB"] == pytest.approx(16)
    assert series["peak_by_component_GiB"][BACKWARD] == pytest.approx(5)
    assert series["phase_starts"]["forward"] < series["phase_starts"]["log-probs"] < series["phase_starts"]["backward"]
    assert series["phase_starts"]["backward"] <= series["peak_x"] < series["phase_starts"]["optimizer"]
    assert series["measured_peak_GiB"] == pytest.approx(16)


def test_totals_equal_live_bytes_at_every_point_and_points_are_bounded():
    events = trace(("mark", 1), *[("alloc", 1000 + i, 0.01) for i in range(3000)],
                   *[("free", 1000 + i) for i in range(0, 3000, 2)])  # fmt: skip
    series = step_components({"resident_bytes": 0, "phases": ["forward"], "events": events}, max_points=100)
    assert len(series["x"]) <= 103 and series["x"] == sorted(series["x"])
    totals = [sum(series["GiB"][c][i] for c in COMPONENTS) for i in range(len(series["x"]))]
    assert max(totals) == pytest.approx(series["peak_GiB"]) == pytest.approx(30, rel=1e-6)
    assert totals[-1] == pytest.approx(15, rel=1e-6)


def test_plot_writes_a_png(tmp_path):
    series = step_components(a_step())
    path = plot_memory_timelines({"before": series, "after": series}, tmp_path / "t.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))


def test_record_step_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the error path is CPU-only")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        record_step(lambda: None)
