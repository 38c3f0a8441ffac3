"""4-bit shared weights: bitsandbytes `Linear4bit` views of vLLM's packed shards.

CPU (CI): a packed parameter laid out as vLLM 0.25's bitsandbytes loader lays it out (shards quantized one by one with
bitsandbytes, codes concatenated, `bnb_shard_offsets` / `bnb_quant_state` / `pack_factor` attributes) is cut into
views, and each view computes what its dequantized weight computes, forward and backward, with a PEFT LoRA on top.
GPU: the same against a real vLLM engine built with `quantization="bitsandbytes"`, in a child process (one
sleep-mode engine per process: the session's engine lives in this one).
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_token_logprobs, run_in_child, vllm_token_logprobs

bnb = pytest.importorskip("bitsandbytes")

from vllm_standby.shared_4bit import is_packed_4bit, linear_4bit_view, split_packed_4bit  # noqa: E402

SHAPES = [(64, 128), (32, 128), (32, 128)]  # q, k, v rows x hidden


def _vllm_like_packed(shapes, dtype=torch.bfloat16, device="cpu"):
    """A vLLM-layout 4-bit parameter and the dequantized weight of each shard (what the codes stand for)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    codes, states, dequantized = [], {}, []
    for index, (rows, cols) in enumerate(shapes):
        weight = torch.randn(rows, cols, dtype=dtype, device=device) * 0.1
        # vLLM quantizes with double quantization, then dequantizes the nested statistics at load: the end state is
        # float32 absmax, nested=False, which is what compress_statistics=False gives directly.
        packed, state = quantize_4bit(weight, compress_statistics=False, quant_type="nf4")
        codes.append(packed)
        states[index] = state
        dequantized.append(dequantize_4bit(packed, state).to(torch.float64))
    param = torch.nn.Parameter(torch.cat(codes), requires_grad=False)
    sizes = [c.shape[0] for c in codes]
    param.use_bitsandbytes_4bit = True
    param.pack_factor = 2  # bf16 params: 16 bits / 8
    param.bnb_quant_state = states
    param.bnb_shard_offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return param, dequantized


def test_shards_are_views_with_their_own_states():
    param, _ = _vllm_like_packed(SHAPES)
    assert is_packed_4bit(param) and not is_packed_4bit(torch.nn.Parameter(torch.zeros(2)))
    shards = split_packed_4bit(param)
    assert [(s.out_features, s.in_features) for s in shards] == SHAPES
    offset = 0
    for index, shard in enumerate(shards):
        assert shard.data.data_ptr() == param.data_ptr() + offset  # uint8: one byte per row of the [N, 1] codes
        assert shard.quant_state is param.bnb_quant_state[index]
        offset += shard.data.numel()
        layer = linear_4bit_view(shard, torch.bfloat16)
        assert layer.weight.data_ptr() == shard.data.data_ptr() and not layer.weight.requires_grad
        assert layer.weight.quant_state is shard.quant_state


def test_view_computes_its_dequantized_weight_forward_and_backward():
    """Each view's output and input gradient equal `x @ W_dq.T` in float64 within bf16 rounding (relative 2e-2)."""
    param, dequantized = _vllm_like_packed(SHAPES)
    for shard, weight in zip(split_packed_4bit(param), dequantized, strict=True):
        layer = linear_4bit_view(shard, torch.bfloat16)
        x = torch.randn(5, shard.in_features, dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        x64 = x.detach().to(torch.float64)
        expected = x64 @ weight.T
        expected_grad = grad_out.to(torch.float64) @ weight
        assert (out.to(torch.float64) - expected).norm() <= 2e-2 * expected.norm()
        assert (x.grad.to(torch.float64) - expected_grad).norm() <= 2e-2 * expected_grad.norm()


def test_peft_puts_its_4bit_lora_layers_on_the_views():
    """QLoRA on the views: PEFT's bitsandbytes LoRA layer wraps them, only the adapter trains, the codes stay put."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    param, _ = _vllm_like_packed(SHAPES)
    shards = split_packed_4bit(param)
    model = torch.nn.Sequential()
    for name, shard in zip(("q_proj", "k_proj", "v_proj"), shards, strict=True):
        model.add_module(name, linear_4bit_view(shard, torch.bfloat16))
    model.is_loaded_in_4bit = True  # what shared_hf_model sets, as transformers' quantizer does
    before = param.detach().clone()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    )
    layer = peft_model.base_model.model.q_proj
    assert isinstance(layer, LoraLinear4bit)
    assert layer.get_base_layer().weight.data_ptr() == param.data_ptr()
    x = torch.randn(3, SHAPES[0][1], dtype=torch.bfloat16)
    loss = sum(
        getattr(peft_model.base_model.model, n)(x).float().square().mean() for n in ("q_proj", "k_proj", "v_proj")
    )
    loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    assert torch.equal(param.detach(), before)


def test_unknown_layout_is_refused():
    param, _ = _vllm_like_packed(SHAPES)
    param.bnb_shard_offsets = torch.tensor([0, 10, 20, 30])
    with pytest.raises(RuntimeError, match="unknown vLLM 4-bit layout"):
        split_packed_4bit(param)


def _real_engine_check(model_dir: str) -> None:
    """Child process: a real vLLM bitsandbytes engine, its shared transformers model, pointers and generations."""
    import peft
    from conftest import BF16_GREEDY_LOGIT_GAP, LORA_RANK, PROMPTS, greedy_vllm

    import vllm_standby

    vllm_standby.register()
    llm = vllm_standby.StandbyLLM(
        model_dir, dtype="bfloat16", quantization="bitsandbytes", enforce_eager=True, max_model_len=128,
        max_num_seqs=4, kv_cache_memory_bytes=64 * 2**20, seed=0, enable_lora=True, max_lora_rank=LORA_RANK,
        max_loras=1,
    )  # fmt: skip
    hf = vllm_standby.shared_hf_model(llm)
    vm = llm.apply_model(lambda model: model)[0]
    assert hf.is_loaded_in_4bit
    for hl, vl in zip(hf.model.layers, vm.model.layers, strict=True):
        qkv = vl.self_attn.qkv_proj.base_layer.weight
        offsets = [int(o) for o in qkv.bnb_shard_offsets]
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            layer = getattr(hl.self_attn, name)
            assert isinstance(layer, bnb.nn.Linear4bit), type(layer)
            assert layer.weight.data_ptr() == qkv.data_ptr() + offsets[index], name
            assert layer.weight.quant_state is qkv.bnb_quant_state[index], name
        down = vl.mlp.down_proj.base_layer.weight
        assert hl.mlp.down_proj.weight.data_ptr() == down.data_ptr()

    def check_tokens(model, outputs):
        # bf16 on both sides (vLLM's bnb GEMM vs transformers' Linear4bit): each greedy token within the gap of
        # the transformers model's best logit on the same prefix (teacher forcing).
        for prompt, out in zip(PROMPTS, outputs, strict=True):
            ids = torch.tensor([prompt + out], device="cuda")
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            chosen = logits.gather(1, torch.tensor(out, device="cuda")[:, None])[:, 0]
            gap = (logits.max(dim=1).values - chosen).max().item()
            assert gap <= BF16_GREEDY_LOGIT_GAP, f"vLLM's token is {gap:.3f} logits below transformers' best"

    check_tokens(hf, greedy_vllm(llm))
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=LORA_RANK, target_modules="all-linear", init_lora_weights=False))
    assert lora.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight.data_ptr() == (
        vm.model.layers[0].self_attn.qkv_proj.base_layer.weight.data_ptr()
    )
    # The adapter through vLLM's LoRA kernels on its 4-bit layers: teacher-forced log-probs of the same tokens,
    # with and without the adapter, in vLLM and in transformers. The adapter moves them by whole units (a random
    # init_lora_weights=False adapter); vLLM must reproduce that move within 10% (bf16 LoRA kernels in vLLM,
    # float32 adapter matmuls in PEFT), and agree without it.
    request = vllm_standby.lora_request(lora)
    sequences = [p + o for p, o in zip(PROMPTS, greedy_vllm(llm, lora_request=request), strict=True)]
    vllm_base, vllm_lora = vllm_token_logprobs(llm, sequences), vllm_token_logprobs(llm, sequences, request)
    hf_lora = hf_token_logprobs(lora, sequences)
    with lora.disable_adapter():
        hf_base = hf_token_logprobs(lora, sequences)
    effect = (hf_lora - hf_base).norm()
    assert effect > 1.0, f"the random adapter barely moved the log-probs ({effect:.3f})"
    error = ((vllm_lora - vllm_base) - (hf_lora - hf_base)).norm()
    base_gap = (vllm_base - hf_base).abs().max()
    print(f"4-bit LoRA: adapter effect {effect:.3f}, vLLM error {error:.3f}, base max gap {base_gap:.4f}")
    assert base_gap < 0.1, f"vLLM and transformers disagree by {base_gap:.3f} without the adapter"
    assert error <= 0.1 * effect, f"vLLM's adapter effect is off by {error:.3f} of {effect:.3f}"
    before = greedy_vllm(llm)
    llm.standby()
    llm.resume()
    assert greedy_vllm(llm) == before


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (vLLM's bitsandbytes layers)")
def test_real_vllm_4bit_engine_is_shared(tiny_qwen3_dir):
    from vllm_standby.shared_4bit import bitsandbytes_in_vllm

    if not bitsandbytes_in_vllm():
        pytest.skip("no bitsandbytes quantization here (vLLM's layers or the bitsandbytes package)")
    run_in_child(_real_engine_check, str(tiny_qwen3_dir))
