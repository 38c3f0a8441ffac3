"""On CUDA: the compiled flex attention kernels (what trains) against gpt-oss's eager attention, as
`test_flex_sinks.py` checks torch's CPU reference of the same op, and their memory at gpt-oss's shapes linear in the
sequence. Skipped without CUDA."""

import pytest
import torch
from test_flex_sinks import LAYERS, compare_with_gpt_oss_eager

from trl_longctx.attention import sink_flex_attention

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

# gpt-oss-20b/120b attention: 64 query heads, 8 key/value heads, head_dim 64, bf16.
HEADS, KV_HEADS, HEAD_DIM = 64, 8, 64


@pytest.mark.parametrize(("layer", "length", "window"), LAYERS, ids=[f"{a}-T{t}-w{w}" for a, t, w in LAYERS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_kernels_match_gpt_oss_eager(layer, length, window, dtype):
    compare_with_gpt_oss_eager(layer, length, window, dtype, device="cuda")


def peak_bytes_of_a_step(tokens: int) -> int:
    from torch.nn.attention.flex_attention import create_block_mask

    causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, tokens, tokens, device="cuda")
    q = torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))  # fmt: skip
    sinks = torch.zeros(HEADS, device="cuda", requires_grad=True)
    sink_flex_attention(q, k, v, causal, sinks).sum().backward()  # compiles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sink_flex_attention(q, k, v, causal, sinks).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_memory_is_linear_in_the_sequence():
    # One head's [T, T] bf16 scores would be 2 GiB at 32768 tokens, all heads' 128 GiB.
    short, long = peak_bytes_of_a_step(16384), peak_bytes_of_a_step(32768)
    q_bytes = 2 * HEADS * 32768 * HEAD_DIM
    assert long < 8 * q_bytes, f"{long / 2**30:.2f} GiB"
    assert long < 2.5 * short, f"{short / 2**30:.2f} GiB -> {long / 2**30:.2f} GiB"
