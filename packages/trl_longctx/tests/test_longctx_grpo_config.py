import pytest

from trl_longctx import LongContextGRPOConfig


def make(**kwargs):
    return LongContextGRPOConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("grpo_mini_batch", 0, "grpo_mini_batch must be a positive integer"),
        ("grpo_mini_batch", -3, "grpo_mini_batch must be a positive integer"),
        ("logit_chunk_multiplier", 0, "logit_chunk_multiplier must be a positive integer"),
        ("logit_chunk_multiplier", 2.5, "logit_chunk_multiplier must be a positive integer"),
        ("logprob_backend", "cuda", r"logprob_backend must be one of \['auto', 'torch', 'triton'\]"),
        ("loss_type", "ppo", r"loss_type must be one of \['grpo', 'dr_grpo', 'dapo'"),
        (
            "vllm_kv_cache_sizing",
            "max",
            r"vllm_kv_cache_sizing must be one of \['rollout', 'utilization'\], got 'max'",
        ),
        ("vllm_prefix_caching", "yes", "vllm_prefix_caching must be True or False, got 'yes'"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        make(**{field: value})


def test_defaults_are_automatic():
    config = make()
    assert config.grpo_mini_batch is None and config.logit_chunk_multiplier is None
    assert config.logprob_backend == "auto"
    assert config.vllm_kv_cache_sizing == "rollout"
    assert config.vllm_prefix_caching is False


def test_use_vllm_when_available_follows_installation():
    from trl.import_utils import is_vllm_available

    assert make(use_vllm_when_available=True).use_vllm == is_vllm_available()
