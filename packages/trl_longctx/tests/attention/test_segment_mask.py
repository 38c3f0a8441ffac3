"""The attention mask of packed rows (`trl_longctx.attention.segment_mask`): every form transformers builds for the
model's attention (sdpa's boolean, eager's additive, flex attention's BlockMask) equals the rule written out query by
query; attentions without such a mask are refused."""

import pytest
import torch
import transformers

from trl_longctx.attention import register_flex_attention
from trl_longctx.attention.segment_mask import segment_attention_mask

# Two documents: the first a prefix of 3 tokens and segments 1 (2 tokens) and 2 (3 tokens); the second a prefix of 2
# tokens and one segment of 1 token (a packed sequence: prompt + completion).
DOCUMENTS = [0] * 8 + [1] * 3
SEGMENTS = [0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 1]


def expected_mask() -> torch.Tensor:
    """`[N, N]`: query q sees key k when k <= q, same document, and k in the prefix or in q's segment."""
    n = len(DOCUMENTS)
    rule = [
        [
            k <= q and DOCUMENTS[k] == DOCUMENTS[q] and (SEGMENTS[k] == 0 or SEGMENTS[k] == SEGMENTS[q])
            for k in range(n)
        ]
        for q in range(n)
    ]
    return torch.tensor(rule)


def config(implementation: str):
    cfg = transformers.Qwen3Config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    cfg._attn_implementation = implementation
    return cfg


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_dense_forms_are_the_rule(implementation):
    documents, segments = torch.tensor(DOCUMENTS), torch.tensor(SEGMENTS)
    mask = segment_attention_mask(config(implementation), documents, segments, torch.float32)
    assert mask.shape == (1, 1, 11, 11)
    if implementation == "eager":
        assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
        mask = mask == 0
    assert torch.equal(mask[0, 0], expected_mask())


def test_block_mask_is_the_rule_and_skips_other_documents():
    """Flex attention's BlockMask (compiled `create_block_mask`, as on CUDA): its mask_mod is the rule, and no block
    pairs queries of one document with keys of another: the kernels skip them, and the mask stores one entry per
    128 x 128 block."""
    register_flex_attention()
    block = 128
    # Three documents of two blocks each: a prefix of one block, then two segments of half a block.
    documents = torch.arange(3).repeat_interleave(2 * block)
    segments = torch.tensor([0] * block + [1] * (block // 2) + [2] * (block // 2)).repeat(3)
    mask = segment_attention_mask(config("longctx_flex"), documents, segments, torch.float32)
    assert type(mask).__name__ == "BlockMask" and mask.shape == (1, 1, 6 * block, 6 * block)
    q, kv = torch.arange(6 * block)[:, None], torch.arange(6 * block)[None, :]
    rule = (kv <= q) & (documents[q] == documents[kv]) & ((segments[kv] == 0) | (segments[kv] == segments[q]))
    assert torch.equal(mask.mask_mod(0, 0, q, kv), rule)
    blocks = mask.to_dense()[0, 0].bool()  # [6, 6]: which blocks any query sees a key of
    assert torch.equal(blocks, torch.block_diag(*[torch.ones(2, 2)] * 3).tril().bool())


def test_flash_attention_is_refused():
    with pytest.raises(ValueError, match=r"needs one of the attentions .*got attn_implementation='flash_attention_2'"):
        segment_attention_mask(config("flash_attention_2"), torch.zeros(3, dtype=torch.long), torch.zeros(3), None)
