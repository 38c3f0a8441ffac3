"""`tools/bench/vision_step.py` on the CPU, before it runs on a GPU: on a two-layer Qwen3-VL with one image per
sequence, TRL's path and ours train the same steps and compute the same mean log-prob on the same tokens (the
optimizer's learning rate is 0, so every step sees the same weights).

Tolerance: float32 on the CPU, the same attention on both paths; the log-probs differ only by the order of the lm_head
reduction (ours chunked over the vocabulary): 1e-5 absolute on a mean log-prob of about -4.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_vision_step", Path(__file__).resolve().parents[1] / "tools" / "bench" / "vision_step.py"
)
vision_step = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = vision_step
_SPEC.loader.exec_module(vision_step)


def test_both_paths_train_on_images_and_agree(tmp_path):
    pytest.importorskip("trl.kernels.chunked_logprob", reason="TRL's fused lm_head needs TRL 1.16 or later")
    out = tmp_path / "vision_step.json"
    rows = vision_step.main(["--tiny", "--device", "cpu", "--lengths", "24", "12", "--prompt-length", "40",
                             "--image-pixels", "4096", "--repeats", "1", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == rows
    assert [(r["provider"], r["L"], r["status"]) for r in rows] == [
        ("trl", 12, "ok"),
        ("ours", 12, "ok"),
        ("trl", 24, "ok"),
        ("ours", 24, "ok"),
    ]
    for length in (12, 24):
        trl, ours = (next(r for r in rows if r["provider"] == p and r["L"] == length) for p in ("trl", "ours"))
        assert trl["patches_per_sequence"] == 16  # 64 x 64 pixels in 16-pixel patches
        assert abs(trl["mean_logp"] - ours["mean_logp"]) < 1e-5, (trl, ours)


def test_cuda_only_settings_are_refused_on_the_cpu():
    with pytest.raises(SystemExit, match="--mode qlora and --memory-gib need --device cuda"):
        vision_step.main(["--tiny", "--device", "cpu", "--mode", "qlora"])


def test_a_prompt_too_short_for_its_images_is_refused():
    config = vision_step.vl_config(4096)
    args = vision_step.argparse.Namespace(image_pixels=65536, num_generations=2, images=2, prompt_length=100)
    with pytest.raises(ValueError, match="--prompt-length 100 leaves no text beside 2 images"):
        vision_step.image_batch(config, args, 0, "cpu", None, seed=0)
