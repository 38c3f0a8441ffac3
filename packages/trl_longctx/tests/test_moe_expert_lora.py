"""LoRA on the fused expert weights of MoE models (PEFT `target_parameters`: `mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) on our fused log-prob path: the same log-probs, entropies, router aux loss and LoRA
gradients (the experts' adapters included) as TRL's path, on tiny random Qwen3-MoE and gpt-oss models, with the
experts untiled and tiled; and a training step that changes every adapter."""

import pytest
import torch
from peft import LoraConfig
from test_longctx_grpo_trainer import random_batch
from test_moe_aux_loss import as_in_training, assert_same, make_trainer, run
from trl import GRPOTrainer

from trl_longctx import LongContextGRPOTrainer

# fp32 end to end, as test_moe_aux_loss: log-probs and entropies of our chunked log-softmax against TRL's fused
# lm_head; the aux loss from router logits of the same decoder. The adapted expert weights are formed by PEFT's
# parametrization in both paths, so only the log-softmax chunks and the tiles' smaller matmuls round differently.
TOLERANCES = {
    "logps": {"atol": 1e-5, "rtol": 1e-4},
    "aux": {"atol": 1e-6, "rtol": 1e-5},
    "grads": {"atol": 1e-5, "rtol": 1e-3},
}
EXPERT_LORA = LoraConfig(
    r=4,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    init_lora_weights=False,
)


@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_expert_lora_matches_trl_path(arch, tiles, tmp_path):
    trainer = make_trainer(arch, tmp_path, peft_config=EXPERT_LORA, tiled_mlp_chunks=tiles)
    as_in_training(trainer)
    expert_adapters = [n for n, p in trainer.model.named_parameters() if p.requires_grad and ".experts." in n]
    assert len(expert_adapters) == 2 * 2 * 2  # lora_A and lora_B of both expert weights, in both layers
    input_ids, attention_mask, keep = random_batch(trainer.model.config.vocab_size)
    ours = run(LongContextGRPOTrainer._get_per_token_logps_and_entropies, trainer, input_ids, attention_mask, keep)
    trl = run(GRPOTrainer._get_per_token_logps_and_entropies, trainer, input_ids, attention_mask, keep)
    assert_same(ours, trl, TOLERANCES)
    assert all(ours[3][n].abs().max() > 0 for n in expert_adapters)  # the experts' adapters got gradients


def test_training_step_changes_every_expert_adapter(tmp_path):
    trainer = make_trainer("qwen3_moe", tmp_path, peft_config=EXPERT_LORA, tiled_mlp_chunks=2, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert not [n for n in before if torch.equal(params[n], before[n])]
    assert trainer.state.log_history[0]["reward_std"] > 0
