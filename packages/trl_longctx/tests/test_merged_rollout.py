"""AdapterMerger: merged forward equals the PEFT model's; base weights restored bit for bit, also after an error."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trl_longctx.merged_rollout import AdapterMerger

# fp32: the merged weight W + s*B@A vs the unmerged W x + s*B(A x): only summation order differs.
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}}


def _peft(tiny_model_dir, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _base(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_merged_forward_matches_and_base_is_restored_exactly(tiny_model_dir):
    model = _peft(tiny_model_dir, torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = _base(model)
    merger = AdapterMerger(model)
    with merger.merged(), torch.no_grad(), model.disable_adapter():
        merged = model(input_ids=ids).logits  # the base weights alone now carry the adapter
        changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    torch.testing.assert_close(merged, expected, **TOLERANCES[torch.float32])
    assert changed, "merging changed no base weight"
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())
    assert merger.host_bytes == sum(before[n].numel() * 4 for n in changed)


@pytest.mark.parametrize("cycles", [5])
def test_bf16_repeated_merges_do_not_drift(tiny_model_dir, cycles):
    model = _peft(tiny_model_dir, torch.bfloat16)
    before = _base(model)
    merger = AdapterMerger(model)
    for _ in range(cycles):
        with merger.merged():
            pass
    after = dict(model.named_parameters())
    # Subtracting the delta again would leave bf16 rounding in the weights; the copy back leaves none.
    assert all(torch.equal(after[n], w) for n, w in before.items())


def test_restored_after_an_error_inside(tiny_model_dir):
    model = _peft(tiny_model_dir, torch.float32)
    before = _base(model)
    with pytest.raises(RuntimeError, match="rollout failed"), AdapterMerger(model).merged():
        raise RuntimeError("rollout failed")
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())


def test_config_rejects_non_bool(tmp_path):
    from trl_longctx import LongContextGRPOConfig

    with pytest.raises(ValueError, match="vllm_merge_adapter must be True, False or None"):
        LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True, vllm_merge_adapter="yes")


def test_expert_adapters_merge_into_the_fused_expert_weights(tmp_path):
    """LoRA on an MoE model's fused experts (PEFT `target_parameters`, nested `ParamWrapper`s): merged into
    `gate_up_proj` / `down_proj` themselves, the merged forward equals the adapted one, and both are restored."""
    from peft import LoraConfig, get_peft_model
    from test_moe_aux_loss import tiny_moe

    from trl_longctx.tiny_models import build_char_tokenizer

    model = tiny_moe("qwen3_moe", build_char_tokenizer()).eval()
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    model = get_peft_model(model, config)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = _base(model)
    with AdapterMerger(model).merged(), torch.no_grad(), model.disable_adapter():
        merged = model(input_ids=ids).logits
        changed = {
            n.rpartition(".")[2] for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
        }
    torch.testing.assert_close(merged, expected, **TOLERANCES[torch.float32])
    assert changed == {"gate_up_proj", "down_proj", "weight"}, changed  # the experts' and q_proj's
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())
