from __future__ import annotations

import pytest

from longctx_kernels import default_chunk_size


@pytest.mark.parametrize("vocab", [1, 123, 1001, 32_000, 151_936, 262_144])
@pytest.mark.parametrize("budget", [1, 4096, 256 * 2**20, 2**33])
def test_power_of_two_within_budget(vocab, budget):
    chunk = default_chunk_size(vocab, budget)
    assert chunk >= 1 and chunk & (chunk - 1) == 0
    assert chunk == 1 or chunk * vocab * 4 <= budget
    assert 2 * chunk * vocab * 4 > budget  # the largest such power of two


def test_default_budget():
    assert default_chunk_size(151_936) == 256  # 256 rows * 151936 * 4 B = 148 MiB <= 256 MiB < 297 MiB


@pytest.mark.parametrize("vocab, budget", [(0, 1), (-5, 1), (10, 0), (2.5, 1), (True, 1)])
def test_rejects_bad_arguments(vocab, budget):
    with pytest.raises(ValueError, match="vocab_size|budget_bytes"):
        default_chunk_size(vocab, budget)
