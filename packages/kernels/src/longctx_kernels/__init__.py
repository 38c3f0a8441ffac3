"""longctx_kernels: fused lm_head + selective log-softmax (log-probs, entropy) that never materializes logits.

Two backends with one API: ``torch`` (chunked, any device, CPU included) and ``triton`` (CUDA).
"""

from longctx_kernels.chunking import default_chunk_size
from longctx_kernels.functional import resolve_backend, selective_logprobs
from longctx_kernels.reference import selective_logprobs_reference
from longctx_kernels.warmup import warm_up, warm_up_in_background

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "default_chunk_size",
    "resolve_backend",
    "selective_logprobs",
    "selective_logprobs_reference",
    "warm_up",
    "warm_up_in_background",
]
