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
        # TRL's own fields, refused before its `__post_init__` (which divided by zero or raised a bare TypeError).
        ("max_completion_length", 0, r"max_completion_length must be a positive integer, got 0\."),
        ("max_completion_length", [8], r"max_completion_length must be a positive integer, got \[8\] \(a list\)"),
        ("num_generations", 0, r"num_generations must be an integer >= 2, got 0\."),
        ("per_device_train_batch_size", True, r"per_device_train_batch_size must be a positive integer, got True"),
        ("vllm_gpu_memory_utilization", 0, r"vllm_gpu_memory_utilization must be a number in \(0, 1\], got 0\."),
        ("learning_rate", "1e-3", r"learning_rate must be a number >= 0, got '1e-3' \(a str\)"),
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


def test_use_vllm_when_available_follows_installation_and_is_not_written_into_the_config(monkeypatch):
    import importlib.util

    from trl_longctx.rollout_plan import resolve_rollout_plan, wants_vllm

    config = make(use_vllm_when_available=True)
    assert config.use_vllm is False  # the config keeps what it was given; the rollout plan resolves it
    assert wants_vllm(config) == (importlib.util.find_spec("vllm") is not None)
    assert wants_vllm(make(use_vllm=True)) and not wants_vllm(make())
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    plan = resolve_rollout_plan(config, "some/model")
    assert plan.engine == "transformers" and not plan.uses_vllm
    assert "vLLM is not installed (use_vllm_when_available=True)" in plan.describe()
    assert [n.feature for n in plan.notices] == ["vLLM rollouts"]
    assert plan.trl_args(config).use_vllm is False


def test_a_copy_is_checked_again():
    import dataclasses

    config = make(max_completion_length=16)
    assert (
        dataclasses.replace(config, generation_batch_size=None, steps_per_generation=None).max_completion_length == 16
    )
    with pytest.raises(ValueError, match="max_completion_length must be a positive integer, got -1"):
        dataclasses.replace(config, max_completion_length=-1, generation_batch_size=None, steps_per_generation=None)
