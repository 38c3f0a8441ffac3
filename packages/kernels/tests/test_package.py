"""Package surface: version, exports, and importing without Triton."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import longctx_kernels

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_pyproject():
    with open(PACKAGE_ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert longctx_kernels.__version__ == project["version"] == "0.1.0"
    assert project["dependencies"] == ["torch>=2.11"]


def test_public_api():
    assert set(longctx_kernels.__all__) == {
        "__version__",
        "default_chunk_size",
        "resolve_backend",
        "selective_logprobs",
        "selective_logprobs_reference",
        "warm_up",
        "warm_up_in_background",
    }
    for name in longctx_kernels.__all__:
        assert hasattr(longctx_kernels, name)


def test_imports_and_runs_without_triton():
    """``sys.modules['triton'] = None`` makes ``import triton`` fail, as on a machine without it."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, longctx_kernels\n"
        "from longctx_kernels import functional\n"
        "assert functional.selective_logprobs_triton is None\n"
        "out = longctx_kernels.selective_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))\n"
        "assert out.shape == (3,)\n"
        "try:\n"
        "    longctx_kernels.selective_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]),"
        " backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "else:\n"
        "    raise SystemExit('backend=triton did not raise')\n"
    )
    src = str(Path(longctx_kernels.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
