"""`capacity.step_capacity`: the most sequences a step takes, checked against the planner's other answers at the
boundary (the search's answer fits, one more does not) and against `rollout_kv`'s utilization formula."""

import pytest

from trl_longctx.memory.capacity import MOST_SEQUENCES, step_capacity
from trl_longctx.memory.planner import CUDA_CONTEXT_GIB, TrainSetup, longest_completion, trainable_state_bytes
from trl_longctx.memory.presets import PRESETS
from trl_longctx.memory.rollout_kv import min_vllm_utilization
from trl_longctx.memory.shapes import GIB

CASES = [("qwen3-8b", 80.0, 2048, 16384), ("qwen3-8b", 141.0, 8192, 8192), ("qwen3-1.7b", 24.0, 1024, 32768)]


@pytest.mark.parametrize(("preset", "gib", "prompt", "completion"), CASES)
def test_training_capacity_is_where_longest_completion_stops_reaching_the_length(preset, gib, prompt, completion):
    shape = PRESETS[preset]
    capacity = step_capacity(shape, TrainSetup(1, prompt, completion), gib)
    assert 1 <= capacity.training < MOST_SEQUENCES and capacity.training_bound == "GPU memory"

    def longest(sequences):
        setup = TrainSetup(sequences, prompt, completion, grpo_mini_batch=1)
        return longest_completion(shape, setup, gib, multiple=1024, tile_mlps=True)

    assert longest(capacity.training) >= completion > longest(capacity.training + 1)


@pytest.mark.parametrize(("preset", "gib", "prompt", "completion"), CASES)
def test_rollout_capacity_matches_the_utilization_formula(preset, gib, prompt, completion):
    shape = PRESETS[preset]
    setup = TrainSetup(1, prompt, completion)
    rollout = step_capacity(shape, setup, gib).rollout
    # What the GPU must hold for n sequences: vLLM's share by `min_vllm_utilization`, the CUDA context, the adapters.
    beside = CUDA_CONTEXT_GIB + trainable_state_bytes(shape, setup) / GIB

    def share(n):
        return min_vllm_utilization(shape, n, prompt, completion, gib) * gib + beside

    assert share(rollout) <= gib < share(rollout + 1)


def test_host_memory_can_be_the_bound():
    shape, setup = PRESETS["qwen3-8b"], TrainSetup(1, 2048, 16384)
    free = step_capacity(shape, setup, 141)
    tight = step_capacity(shape, setup, 141, host_memory_gib=20)
    assert tight.training_bound == "host memory" and 1 <= tight.training < free.training
    assert step_capacity(shape, setup, 141, host_memory_gib=0.001).training == 0


def test_a_given_mini_batch_caps_the_search():
    # Sequences run 4 at a time hold more activations at once than 1 at a time: fewer fit.
    shape = PRESETS["qwen3-8b"]
    one = step_capacity(shape, TrainSetup(1, 2048, 16384), 80).training
    four = step_capacity(shape, TrainSetup(4, 2048, 16384, grpo_mini_batch=4), 80).training
    assert four < one


@pytest.mark.parametrize(
    ("preset", "mode", "note"),
    [
        ("qwen3-30b-a3b", "qlora", "4-bit Mixture-of-Experts models keep TRL's engine"),
        ("qwen3-8b", "full", "full fine-tuning keeps vLLM's own copy"),
    ],
)
def test_rollouts_without_shared_weights_are_not_modeled(preset, mode, note):
    capacity = step_capacity(PRESETS[preset], TrainSetup(1, 256, 4096, mode=mode), 141)
    assert capacity.rollout is None and note in capacity.rollout_note and capacity.training >= 1


def test_plan_prints_the_capacity(capsys):
    from trl_longctx.memory.plan_cli import main

    main(["--model", "qwen3-8b", "--gpu", "H100 80GB", "--prompt-length", "2048", "--completion-length", "16384",
          "--paths", "ours", "--host-memory-gib", "20"])  # fmt: skip
    out = capsys.readouterr().out
    capacity = step_capacity(PRESETS["qwen3-8b"], TrainSetup(1, 2048, 16384), 79.2, host_memory_gib=20)
    assert f"H100 80GB (79.2 GiB): training {capacity.training} (then host memory runs out), rollout " in out
    main(["--model", "qwen3-8b", "--gpu-memory-gib", "80", "--mode", "full", "--paths", "ours"])
    out = capsys.readouterr().out
    assert (
        "vLLM side: not modeled (full fine-tuning keeps vLLM's own copy of the weights" in out
        and "one copy of the weights" not in out
    )
    # That copy is on the GPU while the trainer trains, and the training plan does not count it: the plan says so,
    # with its size (Qwen3-8B: 8.19e9 parameters in bf16) and the setting that releases it.
    bf16_copy = 2 * PRESETS["qwen3-8b"].total_params() / 2**30
    assert 15 < bf16_copy < 16
    assert f"that copy (in bf16 {bf16_copy:.2f} GiB;" in out and "vllm_enable_sleep_mode=True" in out


def test_qlora_rollouts_are_modeled_with_vllms_4bit_weights():
    """QLoRA shares vLLM's 4-bit weights: the rollout side is modeled, and with 9 GiB less of weights beside it than
    bf16 on an 8B model, more sequences fit at once."""
    shape = PRESETS["qwen3-8b"]
    lora, qlora = (step_capacity(shape, TrainSetup(1, 2048, 16384, mode=mode), 80) for mode in ("lora", "qlora"))
    assert qlora.rollout is not None and qlora.rollout_note is None
    assert qlora.rollout > lora.rollout
