"""FP8 shared weights: `Fp8Linear` views of vLLM's online-quantized FP8 weights and their scales.

Without an engine: layers laid out as vLLM 0.25-0.34 lay them out (`fp8_layouts.VLLMFp8Linear`: per tensor and per
channel transposed `[in, out]`, optionally padded to multiples of 16 as CUTLASS pads; per block `[out, in]` with 128 x
128 block scales) are cut into shards whose weights and scales start where vLLM's do, in the checkpoint's names.
With vLLM's CPU build (per channel, the one FP8 scheme it quantizes without AMX): a real engine's model shared by
data pointers, each layer computing what vLLM's own FP8 kernel computes, and a LoRA adapter reaching vLLM in memory.

Tolerances:

| what | tolerance |
| --- | --- |
| a shard's dequantized weight vs the fused layer's `codes * scale` rows (float64) | rtol 2**-23 (one float32 rounding) |
| `scaled_mm` layer output vs vLLM's FP8 kernel (`quant_method.apply`), bf16 | max error <= one bf16 ulp of the largest output (2**-7 x max) |
| dequantized layer output vs vLLM's FP8 kernel (W8A16 vs W8A8), bf16 | norm error <= 2**-4 x norm (e4m3 rounds the activations by <= 2**-4) |
| log-probs of vLLM's greedy tokens, transformers (`scaled_mm`) vs vLLM, bf16, without and with a LoRA adapter (in memory) | max difference <= `FP8_LOGPROB_GAP` |
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import LORA_RANK, PROMPTS, greedy_vllm, run_in_child
from fp8_layouts import VLLMFp8Linear

from vllm_standby.fp8_linear import Fp8Linear, set_matmul
from vllm_standby.shared import _split_packed
from vllm_standby.shared_fp8 import Fp8Shard, check_not_repacked, fp8_in_vllm, split_fp8_layer

# Shard widths (q, k, v) of a fused qkv_proj and its input width: odd-ish for per tensor / per channel (CUTLASS
# pads 88 x 72 to 96 x 80), and with k starting inside a 128-row block for per block.
LAYOUTS = {
    "per-tensor": ([40, 24, 24], 72),
    "per-channel": ([40, 24, 24], 72),
    "per-block": ([160, 48, 48], 200),
}
CASES = [(kind, pad) for kind in LAYOUTS for pad in ((False, True) if kind != "per-block" else (False,))]
# bf16 on both sides, the same FP8 weights and the same activation rounding (each layer alone agrees to the bit), but
# attention and norms sum in other orders: bf16-level differences upstream of a layer flip the e4m3 rounding of its
# input (up to 2**-4 relative per element), so this gap is several times bf16 shared weights' (0.05 covers those).
# Wrong views (a shard or scale misplaced) move log-probs by whole units.
FP8_LOGPROB_GAP = 0.25


def _offsets(widths):
    return [sum(widths[:i]) for i in range(len(widths))]


@pytest.mark.parametrize(("kind", "pad16"), CASES, ids=[f"{k}{'-pad16' if p else ''}" for k, p in CASES])
def test_shards_are_views_of_the_weight_and_their_scales(kind, pad16):
    widths, cols = LAYOUTS[kind]
    layer = VLLMFp8Linear(widths, cols, kind, pad16=pad16)
    shards = split_fp8_layer(layer, "qkv_proj")
    fused = layer.dequantized64()
    row_bytes = layer.weight.stride(1) if kind != "per-block" else layer.weight.stride(0)  # 1-byte codes
    for index, (shard, offset, width) in enumerate(zip(shards, _offsets(widths), widths, strict=True)):
        assert shard.kind == kind and tuple(shard.weight.shape) == (width, cols), index
        assert shard.weight.data_ptr() == layer.weight.data_ptr() + offset * row_bytes, index
        if kind == "per-tensor":
            assert shard.scale.data_ptr() == layer.weight_scale.data_ptr() and shard.scale.numel() == 1
        elif kind == "per-channel":
            assert shard.scale.data_ptr() == layer.weight_scale.data_ptr() + offset * 4
            assert tuple(shard.scale.shape) == (width, 1)
        else:
            scale = layer.weight_scale_inv
            assert shard.scale.data_ptr() == scale.data_ptr() + (offset // 128) * scale.stride(0) * 4
            assert (shard.block_size, shard.row_offset) == ((128, 128), offset % 128)
        view = Fp8Linear(shard.weight, shard.scale, block_size=shard.block_size, row_offset=shard.row_offset)
        torch.testing.assert_close(
            view.dequantized_weight(torch.float64), fused[offset : offset + width], atol=0, rtol=2**-23
        )


class _Block(torch.nn.Module):
    """vLLM's module tree of one decoder layer, LoRA-wrapped as with `enable_lora` (`qkv_proj.base_layer`)."""

    def __init__(self, kind):
        super().__init__()
        self.self_attn, self.mlp = torch.nn.Module(), torch.nn.Module()
        self.self_attn.qkv_proj = torch.nn.Module()
        self.self_attn.qkv_proj.base_layer = VLLMFp8Linear([64, 32, 32], 64, kind, seed=1)
        self.self_attn.qkv_proj.base_layer.bias = torch.nn.Parameter(torch.randn(128), requires_grad=False)
        self.self_attn.o_proj = VLLMFp8Linear([64], 64, kind, seed=2)
        self.mlp.gate_up_proj = VLLMFp8Linear([96, 96], 64, kind, seed=3)
        self.mlp.down_proj = VLLMFp8Linear([64], 96, kind, seed=4)
        self.self_attn.qkv_proj.base_layer.output_partition_sizes = [64, 32, 32]


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_fused_layers_map_to_checkpoint_names(kind):
    """`_split_packed` names each shard as the checkpoint does (q/k/v, gate/up, the rest as they are), splits the
    fused bias, and passes no scale on as a weight of its own."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([_Block(kind)])
    model.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    views = _split_packed(dict(model.named_parameters()), model, "qwen3")
    prefix = "layers.0."
    expected = {f"{prefix}self_attn.{n}.weight": w for n, w in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32))}
    expected |= {f"{prefix}mlp.{n}.weight": 96 for n in ("gate_proj", "up_proj")}
    expected |= {f"{prefix}self_attn.o_proj.weight": 64, f"{prefix}mlp.down_proj.weight": 64}
    shards = {name: view for name, view in views.items() if isinstance(view, Fp8Shard)}
    assert {name: s.weight.shape[0] for name, s in shards.items()} == expected
    biases = {name: view for name, view in views.items() if name.endswith(".bias")}
    assert [tuple(b.shape) for b in biases.values()] == [(64,), (32,), (32,)]
    assert not any("scale" in name for name in views)
    qkv = model.layers[0].self_attn.qkv_proj.base_layer
    assert shards[f"{prefix}self_attn.q_proj.weight"].weight.data_ptr() == qkv.weight.data_ptr()


def test_layouts_it_cannot_view_are_refused():
    marlin = VLLMFp8Linear([32], 64, "per-channel")
    marlin.weight = torch.nn.Parameter(torch.zeros(8, 32, dtype=torch.int32), requires_grad=False)
    with pytest.raises(RuntimeError, match="FP8 Marlin kernel .* repacked the weight.*4-bit NF4 weights"):
        check_not_repacked(marlin, "mlp.down_proj")
    e8m0 = VLLMFp8Linear([128], 128, "per-block")
    e8m0.weight_scale_inv = torch.nn.Parameter(e8m0.weight_scale_inv.to(torch.float8_e8m0fnu), requires_grad=False)
    with pytest.raises(RuntimeError, match="unknown vLLM FP8 layout for o_proj.*scales must be float32"):
        split_fp8_layer(e8m0, "o_proj")
    row_major = VLLMFp8Linear([32], 64, "per-channel")
    row_major.weight = torch.nn.Parameter(row_major.codes, requires_grad=False)  # [out, in] row-major
    with pytest.raises(RuntimeError, match=r"unknown vLLM FP8 layout for o_proj.*need the \[64, 32\] weight column"):
        split_fp8_layer(row_major, "o_proj")


def _engine_kwargs():
    return {
        "dtype": "bfloat16", "quantization": "fp8_per_channel", "enforce_eager": True, "max_model_len": 128,
        "max_num_seqs": 4, "kv_cache_memory_bytes": 64 * 2**20, "seed": 0, "enable_lora": True,
        "max_lora_rank": LORA_RANK, "max_loras": 1,
    }  # fmt: skip


def _sampled_logprobs(llm, model, lora_request=None):
    """vLLM's greedy completions of `PROMPTS` with the log-prob of each sampled token, and `model`'s log-probs of the
    same tokens on the same prefixes (what TRL compares for `sampling/sampling_logp_difference`), float64.

    (Teacher-forced `prompt_logprobs` would be more direct, but vLLM 0.32's CPU LoRA logits path breaks on them.)
    """
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False, lora_request=lora_request)
    vllm_values, hf_values = [], []
    device = next(model.parameters()).device
    for prompt, out in zip(PROMPTS, outs, strict=True):
        tokens = list(out.outputs[0].token_ids)
        vllm_values += [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens, strict=True)]
        ids = torch.tensor([prompt + tokens], device=device)
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].double(), dim=-1)
        hf_values.append(logps.gather(1, ids[0, len(prompt) :, None])[:, 0].cpu())
    return torch.tensor(vllm_values, dtype=torch.float64), torch.cat(hf_values)


def _real_engine_check(model_dir: str) -> None:
    """A real FP8 (per-channel) engine: views by pointer, layer outputs vs vLLM's kernel, log-probs, LoRA in memory."""
    import peft

    import vllm_standby

    llm = vllm_standby.StandbyLLM(model_dir, **_engine_kwargs())
    try:
        hf = vllm_standby.shared_hf_model(llm, fp8_matmul="scaled_mm")
        vm = llm.apply_model(lambda model: model)[0]
        for hl, vl in zip(hf.model.layers, vm.model.layers, strict=True):
            qkv = vl.self_attn.qkv_proj.base_layer
            offset = 0
            for name in ("q_proj", "k_proj", "v_proj"):
                layer = getattr(hl.self_attn, name)
                assert isinstance(layer, Fp8Linear) and layer.matmul == "scaled_mm", name
                assert layer.weight.data_ptr() == qkv.weight.data_ptr() + offset * qkv.weight.stride(1), name
                assert layer.weight_scale.data_ptr() == qkv.weight_scale.data_ptr() + offset * 4, name
                offset += layer.out_features
            assert hl.mlp.down_proj.weight.data_ptr() == vl.mlp.down_proj.base_layer.weight.data_ptr()
        device = next(hf.parameters()).device
        x = torch.randn(5, hf.config.hidden_size, dtype=torch.bfloat16, device=device)

        def vllm_qkv(model):
            layer = model.model.layers[0].self_attn.qkv_proj.base_layer
            return layer.quant_method.apply(layer, x)

        expected = llm.apply_model(vllm_qkv)[0].float()
        attn = hf.model.layers[0].self_attn

        def ours():
            return torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1).float()

        assert (ours() - expected).abs().max() <= 2**-7 * expected.abs().max()
        set_matmul(hf, "dequantize")
        assert (ours() - expected).norm() <= 2**-4 * expected.norm()
        set_matmul(hf, "scaled_mm")
        vllm_base, hf_base = _sampled_logprobs(llm, hf)
        gap = (vllm_base - hf_base).abs().max().item()
        assert gap <= FP8_LOGPROB_GAP, f"transformers on the FP8 views vs vLLM: log-probs differ by {gap:.4f}"
        lora = peft.get_peft_model(
            hf, peft.LoraConfig(r=LORA_RANK, target_modules="all-linear", init_lora_weights=False)
        )
        vllm_lora, hf_lora = _sampled_logprobs(llm, lora, vllm_standby.lora_request(lora))
        gap_lora = (vllm_lora - hf_lora).abs().max().item()
        print(f"FP8 shared weights: log-prob gap {gap:.4f} without, {gap_lora:.4f} with the adapter")
        assert gap_lora <= FP8_LOGPROB_GAP, f"with the adapter, vLLM and transformers differ by {gap_lora:.4f}"
        # The adapter reached vLLM: it changes what vLLM samples (a random adapter moves log-probs by whole units).
        assert greedy_vllm(llm, lora_request=vllm_standby.lora_request(lora)) != greedy_vllm(llm)
    finally:
        del llm
        gc.collect()


@pytest.mark.slow
def test_real_vllm_fp8_engine_is_shared(tiny_qwen3_dir):
    if "per-channel" not in fp8_in_vllm():
        pytest.skip("this vLLM has no online FP8 per-channel quantization (quantization='fp8_per_channel')")
    # Its own process: one sleep-mode engine per process on CUDA, and on CPU the end of an in-process engine tears
    # down vLLM's distributed state under the session's `vllm_llm` (later tests then fail to run it).
    run_in_child(_real_engine_check, str(tiny_qwen3_dir))
