"""Memory of the flex attention path, checked on CPU: nothing of it forms a `[T, T]` tensor.

Two parts, at lengths where one `[T, T]` tensor would dwarf everything else:

- a tiny gpt-oss's forward and backward with `"longctx_flex"`: a dispatch mode records every tensor every op creates.
  Flex attention's own operators (the `flex_attention` and `flex_attention_backward` higher-order ops) count by their
  outputs: on CPU torch runs them through an unfused reference that forms the scores inside, while compiled (CUDA)
  they are fused kernels that never do; how much those kernels hold is a GPU measurement. Everything around them
  (projections, rotary, the sink folding, the MoE, the loss) must stay far below `T * T` bytes. Eager attention on
  the same model records `[B, heads, T, T]` tensors, so the recorder would see one.
- the block masks, built by transformers' masking utilities for `"longctx_flex"` (compiled `create_block_mask`, as in
  training), outside that recorder: dynamo does not trace under a dispatch mode, so there the mask builder would run
  uncompiled. Their peak resident memory grows by far less than one boolean `[T, T]` mask; SDPA's boolean mask at the
  same length shows the measurement sees one.
"""

import os

import pytest
import torch
from test_moe_aux_loss import tiny_moe
from testing_utils import flex_backward_on_cpu
from torch.nn.attention import flex_attention as flex_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from trl_longctx.attention import LONGCTX_FLEX, use_flex_attention
from trl_longctx.tiny_models import build_char_tokenizer

# Tokens per sequence of the model test: one fp32 [T, T] matrix is 64 MiB; the model's largest other tensor is a few.
MODEL_TOKENS = 4096
# Tokens per sequence of the mask test (2 sequences, one left-padded): a boolean [T, T] mask is 256 MiB.
MASK_TOKENS = 16384


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator creates, by bytes (views counted at their full size); higher-order ops
    run with this mode off inside, so they count by their outputs only."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.largest = (0, "nothing")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.numel() * tensor.element_size() > self.largest[0]:
                self.largest = (tensor.numel() * tensor.element_size(), f"{func} -> {tuple(tensor.shape)}")
        return out


def gpt_oss_masks(model, input_ids, attention_mask) -> dict:
    """The per-layer-type masks gpt-oss builds in its forward, built here (outside any dispatch mode)."""
    embeds = model.get_input_embeddings()(input_ids)
    kwargs = {
        "config": model.config,
        "inputs_embeds": embeds,
        "attention_mask": attention_mask,
        "past_key_values": None,
    }
    return {
        "full_attention": create_causal_mask(**kwargs),
        "sliding_attention": create_sliding_window_causal_mask(**kwargs),
    }


def largest_tensor_of_a_step(model, monkeypatch) -> tuple[int, str]:
    input_ids = torch.randint(0, model.config.vocab_size, (1, MODEL_TOKENS))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :100] = 0  # left padding
    masks = gpt_oss_masks(model, input_ids, attention_mask)
    # Flex attention's uncompiled path goes through torch.compile's eager backend, which does not run under a
    # dispatch mode; this switch (torch's, for debugging) calls its operator directly, with the same results.
    monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    recorder = LargestTensor()
    with flex_backward_on_cpu(), recorder:
        logits = model(input_ids=input_ids, attention_mask=masks).logits
        logits.float().logsumexp(-1).sum().backward()
    return recorder.largest


def test_model_step_forms_no_quadratic_tensor_outside_the_kernel(monkeypatch):
    model = tiny_moe("gpt_oss", build_char_tokenizer()).train()
    model.config.sliding_window = 128  # gpt-oss's own window
    use_flex_attention(model)
    assert model.config._attn_implementation == LONGCTX_FLEX
    size, where = largest_tensor_of_a_step(model, monkeypatch)
    assert size < MODEL_TOKENS * MODEL_TOKENS, f"{size / 2**20:.1f} MiB at {where}"
    model.set_attn_implementation("eager")  # the recorder sees eager's scores
    size, where = largest_tensor_of_a_step(model, monkeypatch)
    heads = model.config.num_attention_heads
    assert size >= heads * MODEL_TOKENS * MODEL_TOKENS * 4, f"eager's largest: {size / 2**20:.1f} MiB at {where}"


def _resident_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def peak_growth_of_masks(config, tokens: int) -> int:
    """How much the process's peak resident memory grows while the two masks of 2 sequences of `tokens` are built."""
    attention_mask = torch.ones(2, tokens, dtype=torch.long)
    attention_mask[1, : tokens // 3] = 0
    embeds = torch.empty(2, tokens, config.hidden_size)
    kwargs = {"config": config, "inputs_embeds": embeds, "attention_mask": attention_mask, "past_key_values": None}
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current resident memory
    before = _resident_bytes("VmRSS")
    masks = create_causal_mask(**kwargs), create_sliding_window_causal_mask(**kwargs)
    growth = _resident_bytes("VmHWM") - before
    del masks
    return growth


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads the peak resident memory of Linux")
def test_block_masks_are_built_without_a_quadratic_tensor():
    config = tiny_moe("gpt_oss", build_char_tokenizer()).config
    config.sliding_window = 128
    use_flex_attention(tiny_moe("gpt_oss", build_char_tokenizer()))  # registers the mask builder
    config._attn_implementation = LONGCTX_FLEX
    for tokens in (1000, 1500, 2500):  # compiles the mask builder (static, then dynamic shapes), as a first step does
        peak_growth_of_masks(config, tokens)
    growth = peak_growth_of_masks(config, MASK_TOKENS)
    assert growth < MASK_TOKENS * MASK_TOKENS // 4, f"peak grew by {growth / 2**20:.0f} MiB"
    config._attn_implementation = "sdpa"  # a boolean [2, 1, T, T] mask: the measurement sees it
    assert peak_growth_of_masks(config, MASK_TOKENS) >= MASK_TOKENS * MASK_TOKENS
