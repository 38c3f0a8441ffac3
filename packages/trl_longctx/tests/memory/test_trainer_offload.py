"""`offload_checkpoints` (and `tiled_mlp_chunks`) in the trainer: validation, same log-probs and grads, released."""

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
from trl_longctx.memory import offload_checkpoints
from trl_longctx.tasks import make_copy_letter_dataset

TOLERANCES = {"logps": {"atol": 1e-6, "rtol": 1e-5}, "grads": {"atol": 1e-6, "rtol": 1e-5}}


def config(tmp_path, **overrides):
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 4,
        "max_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "bf16": False,
        "gradient_checkpointing": True,
    }
    return LongContextGRPOConfig(**{**settings, **overrides})


@pytest.mark.parametrize("value", ["yes", 1])
def test_rejects_non_bool(tmp_path, value):
    with pytest.raises(ValueError, match="offload_checkpoints must be True, False or None"):
        config(tmp_path, offload_checkpoints=value)


def test_needs_gradient_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="offload_checkpoints=True needs gradient_checkpointing=True"):
        config(tmp_path, offload_checkpoints=True, gradient_checkpointing=False)


def test_trainer_offload_matches_and_releases(tiny_model_dir, tmp_path, caplog, monkeypatch):
    def reward(completions, **kwargs):
        return [(sum(map(ord, c)) % 7) / 7 for c in completions]

    trainer = LongContextGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=reward,
        args=config(tmp_path, offload_checkpoints=True),
        train_dataset=make_copy_letter_dataset(8),
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    # Trains one step with offloading on (the Trainer turns gradient checkpointing on in `train()`); afterwards nothing
    # stays pinned. Buffers at their exact sizes (no 2 MiB rounding), so the reserved ones serve the step only if
    # they were sized right.
    monkeypatch.setattr(offload_checkpoints, "_BUFFER_GRANULARITY", 1)
    with caplog.at_level("INFO", logger="trl_longctx.longctx_grpo_trainer"):
        trainer.train()
    assert trainer.logprob_pass.offloader.offloaded_count > 0
    # The first step's buffers were reserved after the rollout, sized by its lengths: the step allocated none itself,
    # and the log says what was reserved and how long the step waited for it (the first step's cost over a warm one).
    layers = trainer.model.config.num_hidden_layers
    assert trainer.logprob_pass.offloader.pool_allocations == 0
    reserved = f"step 1: host buffers of offloaded checkpoints: {layers - 1} reserved in the background"
    assert any(m.startswith(reserved) for m in caplog.messages), caplog.messages
    assert trainer.logprob_pass.offloader.buffers_in_use == 0 and trainer.logprob_pass.offloader.pool_bytes == 0
    model = trainer.model
    model.train()
    trainer.logprob_pass.offloader.offloaded_count = 0
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)

    def run(offload, tiles=1):
        trainer.args.offload_checkpoints = offload
        trainer.args.tiled_mlp_chunks = tiles
        model.zero_grad()
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, 4)
        logps.sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_logps, plain_grads = run(False)
    offloaded_logps, offloaded_grads = run(True)
    assert trainer.logprob_pass.offloader.offloaded_count == model.config.num_hidden_layers - 1
    torch.testing.assert_close(offloaded_logps, plain_logps, **TOLERANCES["logps"])
    assert offloaded_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in offloaded_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], **TOLERANCES["grads"], msg=name)
    # Every offload and tiling on at once (the MLP in 3 sequence tiles, a count that does not divide 2 x 9 tokens).
    all_on_logps, all_on_grads = run(True, tiles=3)
    torch.testing.assert_close(all_on_logps, plain_logps, **TOLERANCES["logps"])
    assert all_on_grads.keys() == plain_grads.keys()
    for name, grad in all_on_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], **TOLERANCES["grads"], msg=name)


def test_planned_sizes_follow_free_memory(tiny_model_dir, tmp_path):
    """`grpo_mini_batch=None`, `tiled_mlp_chunks=None` on CUDA ask the planner: the largest mini batch first, MLP
    tiles only when even one sequence does not fit untiled. Here the free memory is given, as the GPU reports it."""
    trainer = LongContextGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=config(tmp_path),
        train_dataset=make_copy_letter_dataset(8),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    model, passes = trainer.model, trainer.logprob_pass
    vocab = model.config.vocab_size

    def planned(sequences, length, completion, free_bytes=None):
        passes.free_bytes = None if free_bytes is None else (lambda: free_bytes)
        sizes = passes.sizes(model.config, vocab, sequences, length, completion)
        return sizes.grpo_mini_batch, sizes.tiled_mlp_chunks

    assert planned(8, 1000, 900) == (8, 1)  # CPU: the batch TRL passes, untiled, no planner
    assert planned(8, 4096, 4000, free_bytes=2**40) == (8, 1)
    assert planned(8, 4096, 3900, free_bytes=2**20)[0] == 1  # nothing fits: 1, never 0
    tight_batch, tight_tiles = planned(8, 65536, 65000, free_bytes=3 * 2**30)
    assert 1 <= tight_batch < 8 and 8 % tight_batch == 0 and tight_tiles == 1
    # One sequence of 262,144 tokens: the planner predicts ~2.4 GiB untiled, ~2.0 GiB with two MLP tiles.
    batch, tiles = planned(1, 262144, 262000, free_bytes=2.3 * 2**30)
    assert batch == 1 and tiles > 1
    trainer.args.tiled_mlp_chunks = 1  # fixed by the user: the planner may not tile
    passes._planned.clear()
    with pytest.warns(UserWarning, match="No chunk sizes fit"):
        assert planned(1, 262144, 262000, free_bytes=2.3 * 2**30) == (1, 1)


def test_reserved_host_buffers_follow_the_planned_passes(tiny_model_dir, tmp_path):
    """After a rollout the trainer reserves one buffer per offloaded layer and decoder pass, sized by TRL's padded
    lengths (`pad_to_multiple_of`) and the sequences per pass; without offloaded checkpoints, nothing."""
    trainer = LongContextGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=config(tmp_path, offload_checkpoints=True, grpo_mini_batch=3, pad_to_multiple_of=4),
        train_dataset=make_copy_letter_dataset(8),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    layers, hidden = trainer.model.config.num_hidden_layers, trainer.model.config.hidden_size
    sizes = trainer.reserve_host_buffers(prompt_length=5, completion_length=3)  # padded: 8 + 4 tokens
    # 4 sequences per step at 3 per pass: passes of 3 and 1; fp32 hidden states; the last layer stays on the device.
    assert sizes == [3 * 12 * hidden * 4] * (layers - 1) + [1 * 12 * hidden * 4] * (layers - 1)
    trainer.logprob_pass.offloader.release()
    (reserved,) = trainer.logprob_pass.offloader.settled_reservations()
    assert reserved.count == 2 * (layers - 1) and reserved.error is None
    trainer.args.offload_checkpoints = False
    assert trainer.reserve_host_buffers(prompt_length=5, completion_length=3) == []
