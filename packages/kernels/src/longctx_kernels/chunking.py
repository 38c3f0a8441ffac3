"""Chunk-size arithmetic shared by the backends."""

from __future__ import annotations

_FP32_BYTES = 4


def default_chunk_size(vocab_size: int, budget_bytes: int = 256 * 2**20) -> int:
    """Largest power-of-two token chunk whose fp32 logits fit in a byte budget.

    One chunk of logits is ``chunk * vocab_size`` fp32 values. The torch backend holds a small multiple of that
    at a time (logits, probabilities and, in the backward, their gradient), so the budget bounds its working set
    up to that factor, whatever the number of tokens.

    Args:
        vocab_size: Number of vocabulary rows ``V`` of the lm_head weight; >= 1.
        budget_bytes: Bytes allowed for one ``[chunk, V]`` fp32 buffer; >= 1. Default 256 MiB.

    Returns:
        A power of two ``chunk >= 1`` with ``chunk * vocab_size * 4 <= budget_bytes``, or 1 when even one row
        exceeds the budget.

    Raises:
        ValueError: If ``vocab_size`` or ``budget_bytes`` is not a positive integer.

    Example:
        >>> default_chunk_size(151_936)  # Qwen vocabulary: 256 rows * 151936 * 4 B = 148 MiB
        256
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
    max_rows = budget_bytes // (vocab_size * _FP32_BYTES)
    if max_rows < 1:
        return 1
    return 1 << (max_rows.bit_length() - 1)
