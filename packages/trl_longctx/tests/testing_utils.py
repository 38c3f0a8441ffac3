"""Helpers shared by the trl_longctx tests (on sys.path through the tests folder's conftest)."""

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float) -> None:
    """`|actual - expected| <= atol + rtol * |expected|` everywhere; on failure, say where and by how much."""
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    worst = torch.argmax(error - allowed).item()
    assert (error <= allowed).all(), (
        f"{what}: max abs error {error.max().item():.3g} at flat index {worst}, allowed {allowed.flatten()[worst]:.3g}"
    )
