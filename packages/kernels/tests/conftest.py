"""Shared fixtures for the longctx_kernels tests.

pytest (default "prepend" import mode) puts this folder on ``sys.path``, so test modules at any depth can
``import kernels_testing``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Fresh, reproducible random inputs in every test."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
