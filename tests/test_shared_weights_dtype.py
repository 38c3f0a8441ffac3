"""The shared engine's weights get the dtype transformers would load the model in (the trainer trains those tensors)."""

import types

import pytest
import torch
from transformers import Qwen3Config

from trl_longctx.vllm_shared import weights_dtype


@pytest.mark.parametrize(
    ("model_init_kwargs", "config_dtype", "expected"),
    [
        (None, "bfloat16", "bfloat16"),  # the checkpoint's own dtype
        ({"dtype": "auto"}, "bfloat16", "bfloat16"),
        ({"dtype": torch.float16}, "bfloat16", "float16"),  # asked for: wins
        ({"dtype": "float32"}, None, "float32"),
        (None, None, "float32"),  # a config naming no dtype: transformers' float32, not vLLM's 16-bit "auto"
        ({"dtype": "auto"}, None, "float32"),
    ],
)
def test_weights_dtype(model_init_kwargs, config_dtype, expected):
    config = Qwen3Config(**({"dtype": config_dtype} if config_dtype else {}))
    args = types.SimpleNamespace(model_init_kwargs=model_init_kwargs)
    assert weights_dtype(args, config) == expected
