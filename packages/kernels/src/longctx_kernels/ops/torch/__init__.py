"""Chunked PyTorch implementations; they run on CPU and on any device."""

from longctx_kernels.ops.torch.selective_logprobs import selective_logprobs_torch

__all__ = ["selective_logprobs_torch"]
