"""Triton (CUDA) kernels; on CPU they run only under ``TRITON_INTERPRET=1``, for tests."""

from longctx_kernels.ops.triton.selective_logprobs import compiled_resources, selective_logprobs_triton

__all__ = ["compiled_resources", "selective_logprobs_triton"]
