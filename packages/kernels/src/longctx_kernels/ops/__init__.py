"""Kernels by backend: ``ops.torch`` (chunked, any device) and ``ops.triton`` (CUDA)."""
