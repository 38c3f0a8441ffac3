"""End to end: LoRA GRPO whose frozen base weights ARE vLLM's tensors (CPU build), adapter handed over in memory."""

import pytest
import torch

pytest.importorskip("vllm")

from conftest import storage_ptrs  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("merge", [False, True], ids=["adapter-request", "merged"])
def test_lora_grpo_with_shared_weights(tmp_path, monkeypatch, merge):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # No VLLM_CPU_KVCACHE_SPACE: the trainer sizes vLLM's KV cache to the rollout (vllm_kv_cache_sizing="rollout").
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    from peft import LoraConfig

    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset
    from trl_longctx.tiny_models import save_tiny_model
    from vllm_standby import _worker, kv_cache_nbytes

    model_dir = save_tiny_model(tmp_path / "model")
    args = LongContextGRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        learning_rate=5e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=64,
        disable_tqdm=True,
        vllm_merge_adapter=merge,
    )
    trainer = LongContextGRPOTrainer(
        model=str(model_dir),
        reward_funcs=copy_letter_reward,
        args=args,
        train_dataset=make_copy_letter_dataset(64),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    llm = trainer.vllm_generation.llm
    vllm_model = llm.collective_rpc(_worker.model_of)[0]
    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    # One copy in memory: every frozen base weight of the trainer lives in a storage of vLLM's weights.
    assert storage_ptrs(base) <= storage_ptrs(vllm_model.parameters())
    assert kv_cache_nbytes(llm) == 0
    # The KV cache holds the rollout's 8 sequences of 64 tokens, each rounded up to 256 tokens: K and V of every
    # layer, float32 (the tiny model's dtype).
    config, cache = trainer.model.config, llm.llm_engine.vllm_config.cache_config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert cache.kv_cache_memory_bytes == 8 * 256 * per_token
    assert 8 * 64 <= cache.num_gpu_blocks * cache.block_size <= 8 * 256
    assert cache.enable_prefix_caching is False  # vllm_prefix_caching's default
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}

    trainer.train()
    # Still one copy after Accelerate prepared the model for training.
    assert storage_ptrs(base) <= storage_ptrs(vllm_model.parameters())
    assert storage_ptrs(p for n, p in trainer.model.named_parameters() if "lora_" not in n) <= storage_ptrs(
        vllm_model.parameters()
    )
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 3
    if merge:
        # vLLM decoded the merged adapter (no LoRA request), and the base weights came back bit for bit.
        assert llm.adapter is None and trainer._adapter_merger.host_bytes > 0
        after = dict(trainer.model.named_parameters())
        assert all(torch.equal(after[n], w) for n, w in before.items())
    else:
        # The adapter reached vLLM under a fresh id at each update.
        assert llm.adapter is not None and llm.adapter.lora_int_id >= 3
    # Either way vLLM sampled from the trainer's policy.
    assert all(h["sampling/sampling_logp_difference/mean"] < 0.05 for h in logs)
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert any(p.abs().sum() > 0 for p in lora.values())  # the adapter trained, so vLLM saw a non-trivial one


def test_kv_cache_sizing_falls_back_to_the_utilization(tmp_path, monkeypatch):
    """The rollout size is passed to vLLM only when it is below what the utilization gives; `"utilization"` and the
    CPU build's VLLM_CPU_KVCACHE_SPACE leave the sizing to vLLM."""
    from transformers import Qwen3Config

    from trl_longctx import LongContextGRPOConfig
    from trl_longctx.vllm_shared import rollout_kv_cache_kwargs

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    config = Qwen3Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, vocab_size=128, max_position_embeddings=1000)  # fmt: skip

    def kwargs(seqs, **fields):
        args = LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True, **fields)
        return rollout_kv_cache_kwargs(config, args, seqs, dtype_bytes=2)

    per_token = 2 * 2 * 32 * 2
    # 300 tokens per sequence, rounded up to 512 (whole blocks of any vLLM block size).
    assert kwargs(4, vllm_max_model_length=300) == {"kv_cache_memory_bytes": 4 * 512 * per_token}
    # No vllm_max_model_length: vLLM derives the length (it may differ from max_position_embeddings), and sizes it.
    assert kwargs(4) == {}
    assert kwargs(10**9, vllm_max_model_length=300) == {}  # above what the utilization gives: vLLM sizes it
    assert kwargs(4, vllm_max_model_length=300, vllm_kv_cache_sizing="utilization") == {}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm.platforms import current_platform

    assert (kwargs(4, vllm_max_model_length=300) == {}) is current_platform.is_cpu()


def test_rollouts_skip_detokenization_unless_stop_strings_need_it():
    """The shared engine returns token ids only (TRL decodes completions itself); stop strings keep the text."""
    from vllm import SamplingParams

    from trl_longctx.vllm_shared import token_ids_only

    plain, stopped = SamplingParams(max_tokens=4, logprobs=0), SamplingParams(max_tokens=4, stop=["\n"])
    ids_only = token_ids_only(plain)
    assert ids_only.detokenize is False and ids_only.max_tokens == 4 and ids_only.logprobs == 0
    assert plain.detokenize is True  # a copy: the caller's params are not changed
    assert token_ids_only(stopped) is stopped and stopped.detokenize is True
    assert [p.detokenize for p in token_ids_only([plain, stopped])] == [False, True]
    assert token_ids_only(None) is None


def test_full_finetuning_refuses_shared_weights(tmp_path):
    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset

    args = LongContextGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, use_vllm=True, vllm_mode="colocate", vllm_shared_weights=True
    )
    with pytest.raises(
        ValueError, match="vllm_shared_weights=True: it needs a LoRA adapter and this run has no"
    ) as error:
        LongContextGRPOTrainer(
            model="unused", reward_funcs=copy_letter_reward, args=args, train_dataset=make_copy_letter_dataset(8)
        )
    assert "Allowed here: pass peft_config=LoraConfig(...), or vllm_shared_weights=False or None." in str(error.value)


_NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


@pytest.mark.parametrize(
    ("quantization", "merge", "message"),
    [
        ({"load_in_4bit": True}, None, "need BitsAndBytesConfig\\(load_in_4bit=True, bnb_4bit_quant_type='nf4'\\)"),
        ({"load_in_8bit": True}, None, "need BitsAndBytesConfig\\(load_in_4bit=True, bnb_4bit_quant_type='nf4'\\)"),
        (_NF4, True, "vllm_merge_adapter=True cannot merge a LoRA adapter into 4-bit shared weights"),
        (_NF4, None, "has no bitsandbytes quantization"),
    ],
    ids=["fp4", "8bit", "nf4-merged", "nf4-vllm-without-bnb"],
)
def test_quantized_model_refusals_come_before_loading(tmp_path, quantization, merge, message):
    """QLoRA with shared weights asked for explicitly: what cannot work is refused with the reason and the allowed
    values before any model or engine is built (the model path does not even exist)."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset
    from vllm_standby.shared_4bit import bitsandbytes_in_vllm

    if message.startswith("has no") and bitsandbytes_in_vllm():
        pytest.skip("this vLLM has bitsandbytes: the QLoRA engine would be built")
    args = LongContextGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, use_vllm=True, vllm_mode="colocate", vllm_shared_weights=True,
        vllm_merge_adapter=merge, model_init_kwargs={"quantization_config": BitsAndBytesConfig(**quantization)},
    )  # fmt: skip
    with pytest.raises(ValueError, match=message) as error:
        LongContextGRPOTrainer(
            model=str(tmp_path / "not-loaded"), reward_funcs=copy_letter_reward, args=args,
            train_dataset=make_copy_letter_dataset(8), peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )  # fmt: skip
    assert "Allowed" in str(error.value)
    assert not (tmp_path / "not-loaded").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (vLLM's bitsandbytes layers)")
def test_qlora_grpo_with_shared_4bit_weights(tmp_path, monkeypatch):
    """QLoRA with one copy: vLLM quantizes the checkpoint to NF4, the trainer's Linear4bit layers are views of its
    shards, the adapter reaches vLLM as a LoRA request, and vLLM samples from the trainer's policy."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset
    from trl_longctx.tiny_models import save_tiny_model
    from vllm_standby import _worker
    from vllm_standby.shared_4bit import bitsandbytes_in_vllm

    if not bitsandbytes_in_vllm():
        pytest.skip("no bitsandbytes quantization here (vLLM's layers or the bitsandbytes package)")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir = save_tiny_model(tmp_path / "model")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    args = LongContextGRPOConfig(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=6, learning_rate=5e-2, logging_steps=1, report_to="none", bf16=True,
        save_strategy="no", use_vllm=True, vllm_mode="colocate", vllm_max_model_length=64,
        vllm_gpu_memory_utilization=0.2, disable_tqdm=True, vllm_shared_weights=True,
        model_init_kwargs={"quantization_config": nf4, "dtype": "bfloat16"},
    )  # fmt: skip
    trainer = LongContextGRPOTrainer(
        model=str(model_dir), reward_funcs=copy_letter_reward, args=args, train_dataset=make_copy_letter_dataset(64),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )  # fmt: skip
    llm = trainer.vllm_generation.llm
    vllm_model = llm.collective_rpc(_worker.model_of)[0]
    assert trainer.model.is_loaded_in_4bit and not trainer.vllm_generation.merge_adapter
    four_bit = [p for n, p in trainer.model.named_parameters() if p.dtype == torch.uint8]
    assert len(four_bit) == 7 * trainer.model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    assert storage_ptrs(four_bit) <= storage_ptrs(vllm_model.parameters())
    trainer.train()
    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert storage_ptrs(base) <= storage_ptrs(vllm_model.parameters())
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 3 and llm.adapter is not None and llm.adapter.lora_int_id >= 3
    # bf16 on both sides: vLLM's 4-bit GEMM and bitsandbytes' dequantize + matmul round differently.
    assert all(h["sampling/sampling_logp_difference/mean"] < 0.1 for h in logs)
