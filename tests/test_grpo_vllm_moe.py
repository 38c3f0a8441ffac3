"""A tiny Qwen3-MoE on the real vLLM CPU build: it serves the checkpoint exactly, but TRL's weight sync scrambles its
experts, so the trainer refuses MoE rollouts with vLLM's CPU build before anything loads.

The CPU build prepacks expert weights for its kernel after loading the checkpoint (`cpu_moe`'s
`process_weights_after_loading`); TRL's colocated weight sync (`model.load_weights([(name, tensor)])`) later writes
the trainer's tensors into those packed parameters in the checkpoint's layout. `test_cpu_build_scrambles_resynced_
experts` pins that behaviour: when it fails, vLLM re-packs on `load_weights` (or keeps the layout) and
`rollout_plan._refuse_moe_weight_sync_on_cpu` can go.
"""

import pytest

pytest.importorskip("vllm")

from conftest import DISTRIBUTED_ENV  # noqa: E402

pytestmark = pytest.mark.slow

# fp32 engine against transformers in fp32: the same checkpoint's prompt log-probs (vLLM's kernels vs eager torch).
TOLERANCES = {"served": {"atol": 1e-4}}
PROMPT = "copy: k and copy: z then"


def save_tiny_qwen3_moe(folder):
    """A tiny random Qwen3-MoE (2 layers, 4 experts of 64, top 2; head_dim 64 for vLLM's CPU attention) and the
    character tokenizer."""
    import torch
    import transformers

    from trl_longctx.tiny_models import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen3MoeForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def prompt_logprob_error(llm, model, token_ids) -> float:
    """Max |vLLM's prompt log-probs - the transformers model's| over the prompt's tokens."""
    import torch
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    served = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0].prompt_logprobs
    ours = torch.tensor([served[i][token_ids[i]].logprob for i in range(1, len(token_ids))])
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([token_ids])).logits.float().log_softmax(-1)[0, :-1]
    return (ours - logps.gather(-1, torch.tensor(token_ids[1:])[:, None])[:, 0]).abs().max().item()


def served_then_resynced(folder: str) -> dict:
    """In a fresh process (vLLM's distributed state is per process, and an engine of a dense model built earlier in
    the test process leaves no expert-parallel group for an MoE engine): serve the checkpoint, then sync its own
    weights as TRL's colocate mode does, and report the prompt log-prob errors and the experts' layout."""
    import torch
    import transformers
    from vllm import LLM

    import vllm_standby

    vllm_standby.enable()  # the CPU weight patch TRL's weight sync relies on for dense weights
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    llm = LLM(folder, max_model_len=64, dtype="float32", enforce_eager=True)
    token_ids = tokenizer(PROMPT)["input_ids"]
    served = prompt_logprob_error(llm, model, token_ids)
    vllm_model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    packed = dict(vllm_model.named_parameters())["model.layers.0.mlp.experts.routed_experts.w13_weight"]
    experts = model.model.layers[0].mlp.experts
    prepacked = not torch.equal(packed, experts.gate_up_proj)
    for name, param in model.named_parameters():  # TRL's colocated sync of the very same weights
        vllm_model.load_weights([(name, param)])
    llm.reset_prefix_cache()
    return {
        "served": served, "prepacked": prepacked, "checkpoint_layout_after_sync": torch.equal(packed, experts.gate_up_proj),
        "after_sync": prompt_logprob_error(llm, model, token_ids),
    }  # fmt: skip


def test_cpu_build_scrambles_resynced_experts(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's CPU build")
    save_tiny_qwen3_moe(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    here = str(Path(__file__).resolve().parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import test_grpo_vllm_moe as t; "
            f"print('RESULT ' + json.dumps(t.served_then_resynced({str(tmp_path / 'model')!r})))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    rows = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and rows, f"child failed ({done.returncode}):\n{done.stderr[-3000:]}"
    result = json.loads(rows[-1].removeprefix("RESULT "))
    assert result["served"] <= TOLERANCES["served"]["atol"]  # the checkpoint: exact
    assert result["prepacked"]  # prepacked at load
    # TRL's sync of the same weights: the packed tensor now holds the checkpoint's layout, which the kernel reads as
    # packed: the served log-probs leave the model's.
    assert result["checkpoint_layout_after_sync"]
    assert result["after_sync"] > 100 * TOLERANCES["served"]["atol"]


def test_trainer_refuses_moe_rollouts_on_the_cpu_build_before_loading(tmp_path, monkeypatch):
    from vllm.platforms import current_platform

    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset

    if not current_platform.is_cpu():
        pytest.skip("vLLM's CPU build")
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    save_tiny_qwen3_moe(tmp_path / "model")
    args = LongContextGRPOConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, use_vllm=True, vllm_mode="colocate", report_to="none",
        per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot roll out a Mixture-of-Experts model \(4 experts per MoE layer\)"):
        LongContextGRPOTrainer(
            model=str(tmp_path / "model"), reward_funcs=copy_letter_reward, args=args,
            train_dataset=make_copy_letter_dataset(16),
        )  # fmt: skip
    assert not (tmp_path / "run").exists()
