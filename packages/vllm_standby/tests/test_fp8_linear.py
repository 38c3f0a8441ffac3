"""`Fp8Linear`: the dequantized and the `torch._scaled_mm` forward, the input-only backward, and LoRA on top via PEFT.

Tolerances (`../../../shared/STYLE.md` section 3), each against a float64 reference on the same FP8 codes and scales:

| what | input dtype | tolerance |
| --- | --- | --- |
| dequantized weight (a block-scaled shard starting inside a block) vs `codes * scale` | - | rtol 2**-23 (one float32 rounding) |
| dequantized forward vs `x @ (codes * scale).T` | fp32 | atol 1e-5, rtol 1e-4 |
| same, and the input gradient vs `g @ (codes * scale)` | bf16 | err <= 2 x err of naive bf16 torch (`x @ W.bf16().T`) + 1e-3 (grads + 1e-2) |
| `scaled_mm` forward vs `q(x) @ (codes * scale).T`, `q` vLLM's per-token FP8 rounding of `x` in float64 | fp32 | atol 1e-5, rtol 1e-4 |
| `scaled_mm` input gradient vs `q(g * scale.T) @ codes` (per-tensor: times the scale), `q` the same per-row rounding | fp32 | atol 1e-5, rtol 1e-3 |
| dequantized input gradient (straight through) | fp32 | atol 1e-5, rtol 1e-3 |
| PEFT LoRA on `Fp8Linear` vs PEFT LoRA on an `nn.Linear` holding the dequantized weight: output, input and LoRA grads | fp32 | atol 1e-5, rtol 1e-4 (grads rtol 1e-3) |
| CUDA (`gpu`, capability >= 8.9): `scaled_mm` output and input gradient vs the float64 W8A8 products | bf16 | max error <= 2**-5 x max: one bf16 rounding plus FP8 tensor cores' accumulation, whose limited precision (a known Hopper trait) gave up to 1.4% at K = 512 |

The CPU `scaled_mm` rows run torch's CPU implementation of `torch._scaled_mm`; the GPU path is the same call, checked
by the `gpu` test and timed by `tools/bench/fp8_rollout.py matmul`.
"""

from __future__ import annotations

import pytest
import torch
from fp8_layouts import FP8, FP8_MAX, dequantized64, quantize

from vllm_standby.fp8_linear import (
    AUTO_REASON,
    Fp8Linear,
    _cpu_rowwise_scaled_mm,
    capability_problem,
    dequantize_fp8,
    fp8_linear,
    matmul_summary,
    resolve_matmul,
    scale_kind,
    set_matmul,
)

# torch's CPU `_scaled_mm` takes a scale per row from 2.13 (CI's CPU build); older CPU builds refuse the W8A8 rows.
needs_cpu_scaled_mm = pytest.mark.skipif(
    not _cpu_rowwise_scaled_mm(), reason=f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only"
)
FP32_FORWARD = {"atol": 1e-5, "rtol": 1e-4}
FP32_GRAD = {"atol": 1e-5, "rtol": 1e-3}
KINDS = ["per-tensor", "per-channel", "per-block"]
# Odd shapes; the per-block one spans two block rows and a partial block column.
SHAPES = {"per-tensor": (47, 96), "per-channel": (47, 96), "per-block": (200, 150)}


def _layer_inputs(kind, dtype=torch.float32, rows=5):
    out, cols = SHAPES[kind]
    weight = torch.randn(out, cols) * torch.linspace(0.05, 0.5, out)[:, None]
    codes, scale = quantize(weight, kind)
    x = torch.randn(2, rows, cols, dtype=dtype)
    return codes, scale, x, dequantized64(codes, scale, kind)


def _block(kind):
    return (128, 128) if kind == "per-block" else None


def assert_close_report(actual, expected, what, **tolerance):
    """`torch.testing.assert_close` whose failure says what was compared and by how much it missed."""
    torch.testing.assert_close(actual, expected, check_dtype=False, msg=lambda m: f"{what}: {m}", **tolerance)


def _relative_rule(actual, naive, reference, slack, what):
    """bf16: the error of `actual` at most twice the naive same-dtype torch error, plus `slack` (STYLE.md)."""
    err = (actual.double() - reference).abs().max().item()
    naive_err = (naive.double() - reference).abs().max().item()
    assert err <= 2 * naive_err + slack, f"{what}: max error {err:.3g} vs naive bf16 {naive_err:.3g} (+{slack})"


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_forward_and_input_grad_fp32(kind):
    codes, scale, x, w64 = _layer_inputs(kind)
    layer = Fp8Linear(codes, scale, block_size=_block(kind), matmul="dequantize")
    assert layer.scale_kind == kind and layer.matmul == "dequantize"
    x.requires_grad_(True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert_close_report(out, x.detach().double() @ w64.T, f"{kind} forward", **FP32_FORWARD)
    assert_close_report(x.grad, grad_out.double() @ w64, f"{kind} input grad", **FP32_GRAD)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_forward_and_input_grad_bf16(kind):
    codes, scale, x, w64 = _layer_inputs(kind, torch.bfloat16)
    layer = Fp8Linear(codes, scale, block_size=_block(kind), matmul="dequantize")
    x.requires_grad_(True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert out.dtype == x.grad.dtype == torch.bfloat16
    w_bf16 = w64.to(torch.bfloat16)
    _relative_rule(out, x.detach() @ w_bf16.T, x.detach().double() @ w64.T, 1e-3, f"{kind} bf16 forward")
    _relative_rule(x.grad, grad_out @ w_bf16, grad_out.double() @ w64, 1e-2, f"{kind} bf16 input grad")


def _quantized_rows64(x):
    """vLLM's dynamic per-token FP8 rounding of `x` `[M, K]`, in float64: `(codes, scale)` with `codes * scale ~ x`."""
    x64 = x.double()
    scale = (x64.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1 / (FP8_MAX * 512)).float().double()
    return (x64 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).double(), scale


def _w8a8_input_grad64(grad_out, codes, scale, kind):
    """The `scaled_mm` layer's input gradient in float64: the output gradient times the per-channel scale (in
    float32, as the layer multiplies), rounded per row as the activations are, times the FP8 codes (per-tensor: and
    the scale)."""
    g = grad_out.reshape(-1, codes.shape[0]).float()
    if kind == "per-channel":
        g = g * scale.float().reshape(1, -1)
    q, q_scale = _quantized_rows64(g)
    w = codes.double() * (scale.double().reshape(()) if kind == "per-tensor" else 1.0)
    return ((q * q_scale) @ w).reshape(*grad_out.shape[:-1], codes.shape[1])


@needs_cpu_scaled_mm
@pytest.mark.parametrize("kind", ["per-tensor", "per-channel"])
def test_scaled_mm_forward_and_input_grad_are_w8a8(kind):
    """`scaled_mm` multiplies per-token FP8 activations by the FP8 weight, and per-row FP8 output gradients (times
    the per-channel scale) by the FP8 weight: each equal to that product in float64."""
    codes, scale, x, w64 = _layer_inputs(kind, rows=6)
    out_dim, cols = SHAPES[kind]
    # torch._scaled_mm wants dims that are multiples of 16: the layer's (47, 96) is cut to (32, 96).
    codes, scale, w64 = codes[:32], (scale if kind == "per-tensor" else scale[:32]), w64[:32]
    layer = Fp8Linear(codes, scale, matmul="scaled_mm", compute_dtype=torch.float32)  # fp32 out: CPU only
    x.requires_grad_(True)
    out = layer(x)
    q, q_scale = _quantized_rows64(x.detach().reshape(-1, cols))
    expected = ((q * q_scale) @ w64.T).reshape(2, 6, 32)
    assert_close_report(out, expected, f"{kind} scaled_mm forward", **FP32_FORWARD)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected_grad = _w8a8_input_grad64(grad_out, codes, scale, kind)
    assert_close_report(x.grad, expected_grad, f"{kind} scaled_mm input grad", **FP32_GRAD)
    # Not the dequantized (straight-through) gradient: the output gradient's FP8 rounding shows.
    assert (x.grad.double() - grad_out.double() @ w64).abs().max() > 1e-4


def test_dequantize_blocks_with_a_row_offset():
    """A shard that starts inside a block row (k of a fused qkv with 128-row blocks) reads the right scales."""
    codes, scale = quantize(torch.randn(300, 130), "per-block")
    w64 = dequantized64(codes, scale, "per-block")
    rows = slice(140, 230)  # starts 12 rows into block row 1, ends in block row 1
    shard_scale = scale[140 // 128 : -(-230 // 128)]
    got = dequantize_fp8(codes[rows], shard_scale, torch.float64, (128, 128), row_offset=140 % 128)
    assert scale_kind(codes[rows], shard_scale, (128, 128), 12) == "per-block"
    # The float32 product of a 4-bit code and a float32 scale rounds once.
    assert_close_report(got, w64[rows], "block shard dequantized", atol=0, rtol=2**-23)


@needs_cpu_scaled_mm
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_float32_temporaries_change_nothing(kind, monkeypatch):
    """Dequantization and activation quantization work a few rows at a time (bounded float32 temporaries): the same
    results, bit for bit, as in one piece."""
    import vllm_standby.fp8_linear as module
    import vllm_standby.fp8_quant as quant_module

    codes, scale, x, _ = _layer_inputs(kind)
    matmul = "scaled_mm" if kind == "per-channel" else "dequantize"
    shard_scale = {"per-tensor": scale, "per-channel": scale[:32], "per-block": scale[:1]}[kind]
    layer = Fp8Linear(codes[:32], shard_scale, block_size=_block(kind), compute_dtype=torch.float32, matmul=matmul)
    whole = (layer(x), layer.dequantized_weight(torch.float32))
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 3 * codes.shape[1] + 5)  # 3 rows per chunk, a partial last one
    monkeypatch.setattr(quant_module, "_CHUNK_ELEMENTS", 3 * codes.shape[1] + 5)
    assert len(module._row_chunks(32, codes.shape[1])) == 11
    chunked = (layer(x), layer.dequantized_weight(torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))


def test_bias_and_its_gradient():
    codes, scale, x, w64 = _layer_inputs("per-channel")
    bias = torch.randn(SHAPES["per-channel"][0], requires_grad=True)
    out = fp8_linear(x, codes, scale, bias, matmul="dequantize")
    out.sum().backward()
    assert_close_report(out, x.double() @ w64.T + bias.detach().double(), "forward with bias", **FP32_FORWARD)
    assert torch.equal(bias.grad, torch.full_like(bias, 10.0))  # 2 x 5 rows of ones


def _peft_pair(kind):
    """The same three layers twice: `Fp8Linear`s, and `nn.Linear`s holding their dequantized fp32 weights."""
    out, cols = SHAPES[kind]
    fp8, dense = torch.nn.Module(), torch.nn.Module()
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        weight = torch.randn(out, cols) * (0.1 + index)
        codes, scale = quantize(weight, kind)
        fp8.add_module(name, Fp8Linear(codes, scale, block_size=_block(kind), compute_dtype=torch.float32))
        linear = torch.nn.Linear(cols, out, bias=False)
        linear.weight = torch.nn.Parameter(dequantized64(codes, scale, kind).float(), requires_grad=False)
        dense.add_module(name, linear)
    return fp8, dense


def _lora_grads(model, x, r):
    x = x.clone().requires_grad_(True)
    outs = [getattr(model.base_model.model, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    # A loss linear in the outputs: its gradients do not depend on the base's forward values.
    sum((o * r).sum() for o in outs).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(outs), x.grad, grads


@pytest.mark.parametrize("kind", KINDS)
def test_peft_lora_on_fp8_equals_lora_on_the_dequantized_weight(kind):
    """PEFT's default dispatch wraps each `Fp8Linear` (found by `target_modules="all-linear"`) in its `lora.Linear`;
    outputs, input gradients and LoRA gradients equal LoRA on dense layers holding the dequantized weights. The FP8
    codes stay put, and the adapters are in `compute_dtype`, never FP8."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    fp8, dense = _peft_pair(kind)
    codes_before = [m.weight.detach().clone() for m in fp8.children()]
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}
    torch.manual_seed(1)
    fp8_model = get_peft_model(fp8, LoraConfig(**config))
    torch.manual_seed(1)
    dense_model = get_peft_model(dense, LoraConfig(**config))
    q_proj = fp8_model.base_model.model.q_proj
    assert isinstance(q_proj, LoraLinear) and isinstance(q_proj.get_base_layer(), Fp8Linear)
    assert q_proj.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 7, SHAPES[kind][1])
    r = torch.randn(3, 7, SHAPES[kind][0])
    out, x_grad, grads = _lora_grads(fp8_model, x, r)
    ref_out, ref_x_grad, ref_grads = _lora_grads(dense_model, x, r)
    assert set(grads) == set(ref_grads) and grads and all("lora_" in n for n in grads)
    assert_close_report(out, ref_out, f"{kind} LoRA output", **FP32_FORWARD)
    assert_close_report(x_grad, ref_x_grad, f"{kind} input grad", **FP32_GRAD)
    for name, grad in grads.items():
        assert_close_report(grad, ref_grads[name], f"{kind} {name}", **FP32_GRAD)
    assert all(torch.equal(m.weight, c) for m, c in zip(fp8.children(), codes_before, strict=True))


def test_peft_adapters_take_the_compute_dtype_not_fp8():
    """PEFT moves new adapters to their base layer's dtype (`compute_dtype` when the layer has one): bf16 here,
    without PEFT's fp32 upcast."""
    from peft import LoraConfig, get_peft_model

    codes, scale = quantize(torch.randn(32, 64), "per-channel")
    model = torch.nn.Module()
    model.add_module("proj", Fp8Linear(codes, scale, compute_dtype=torch.bfloat16))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["proj"]), autocast_adapter_dtype=False)
    lora = peft_model.base_model.model.proj
    assert lora.lora_A["default"].weight.dtype == lora.lora_B["default"].weight.dtype == torch.bfloat16
    assert lora.get_base_layer().weight.dtype == FP8
    assert lora(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@needs_cpu_scaled_mm
def test_scaled_mm_path_lora_grads_equal_the_dequantized_path():
    """With a loss linear in the output, the LoRA gradients of the `scaled_mm` layers equal the dequantized layers'
    exactly (they see the same output gradient and input); the forward values and the input gradient differ by the
    FP8 rounding of the activations and of the output gradient only (e4m3: at most 2**-4 relative per element)."""
    from peft import LoraConfig, get_peft_model

    codes, scale = quantize(torch.randn(32, 64), "per-channel")
    models = []
    for matmul in ("scaled_mm", "dequantize"):
        model = torch.nn.Module()
        model.add_module("q_proj", Fp8Linear(codes, scale, compute_dtype=torch.float32, matmul=matmul))
        model.add_module("k_proj", Fp8Linear(codes, scale, compute_dtype=torch.float32, matmul=matmul))
        model.add_module("v_proj", Fp8Linear(codes, scale, compute_dtype=torch.float32, matmul=matmul))
        torch.manual_seed(2)
        models.append(get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)))
    x, r = torch.randn(4, 64), torch.randn(4, 32)
    (out_mm, x_grad_mm, grads_mm), (out_dq, x_grad_dq, grads_dq) = (_lora_grads(m, x, r) for m in models)
    assert all(torch.equal(grads_mm[n], grads_dq[n]) for n in grads_dq)
    assert 0 < (out_mm - out_dq).norm() <= 2**-4 * out_dq.norm()
    assert 0 < (x_grad_mm - x_grad_dq).norm() <= 2**-4 * x_grad_dq.norm()


@needs_cpu_scaled_mm
def test_matmul_resolution_names_what_runs_and_why():
    codes, scale = quantize(torch.randn(32, 64), "per-channel")
    for kind in ("per-channel", "per-block"):  # "auto" dequantizes: the faster of the two for the trainer
        assert resolve_matmul("auto", codes, kind) == ("dequantize", f"matmul='auto': {AUTO_REASON}")
    assert resolve_matmul("scaled_mm", codes, "per-channel")[0] == "scaled_mm"
    with pytest.raises(ValueError, match=r"matmul='scaled_mm' cannot run this layer: its scales are per block"):
        resolve_matmul("scaled_mm", codes, "per-block")
    with pytest.raises(ValueError, match=r"matmul must be one of \['auto', 'scaled_mm', 'dequantize'\], got 'fp8'"):
        resolve_matmul("fp8", codes, "per-channel")
    assert capability_problem((9, 0)) is None and capability_problem((8, 9)) is None
    assert "compute capability >= 8.9 (Ada, Hopper or newer); this one has 8.0" in capability_problem((8, 0))
    model = torch.nn.Sequential(Fp8Linear(codes, scale, matmul="dequantize"), Fp8Linear(codes, scale))
    assert set_matmul(model, "scaled_mm") == {"scaled_mm": 2}
    reason = "matmul='scaled_mm'; rows quantized by torch on cpu (the Triton kernel runs on CUDA only)"
    assert matmul_summary(model) == {"scaled_mm": (2, reason)}


def test_bad_weights_and_scales_are_refused():
    codes, scale = quantize(torch.randn(32, 64), "per-channel")
    with pytest.raises(ValueError, match="needs a 2-D torch.float8_e4m3fn weight, got torch.float32"):
        Fp8Linear(codes.float(), scale)
    with pytest.raises(ValueError, match=r"scale \(16, 1\) is neither per-tensor"):
        Fp8Linear(codes, scale[:16])
    with pytest.raises(ValueError, match="scales must be float32, got torch.bfloat16"):
        Fp8Linear(codes, scale.bfloat16())
    with pytest.raises(ValueError, match=r"needs a scale of shape \(1, 1\), got \(2, 1\)"):
        Fp8Linear(codes, torch.ones(2, 1), block_size=(128, 128))
    with pytest.raises(RuntimeError, match="never re-initialized"):
        Fp8Linear(codes, scale).reset_parameters()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["per-tensor", "per-channel"])
def test_scaled_mm_on_cuda(kind):
    """On a GPU of compute capability >= 8.9, `"scaled_mm"` runs `torch._scaled_mm` forward and backward: its bf16
    output and input gradient are the W8A8 products (max error <= 2**-5 x max |value|, see the table)."""
    from vllm_standby.fp8_linear import capability_problem

    if capability_problem(torch.cuda.get_device_capability()) is not None:
        pytest.skip(capability_problem(torch.cuda.get_device_capability()))
    codes, scale = quantize(torch.randn(256, 512) * 0.05, kind)
    w64 = dequantized64(codes, scale, kind)
    layer = Fp8Linear(codes.cuda(), scale.cuda(), matmul="scaled_mm")
    assert layer.matmul == "scaled_mm", layer.matmul_reason
    x = torch.randn(3, 40, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q, q_scale = _quantized_rows64(x.detach().float().reshape(-1, 512).cpu())
    expected = ((q * q_scale) @ w64.T).reshape(3, 40, 256)
    assert (out.double().cpu() - expected).abs().max() <= 2**-5 * expected.abs().max()
    expected_grad = _w8a8_input_grad64(grad_out.cpu(), codes, scale, kind)
    assert (x.grad.double().cpu() - expected_grad).abs().max() <= 2**-5 * expected_grad.abs().max()


@needs_cpu_scaled_mm
def test_an_enclosing_autocast_changes_nothing():
    """The trainer's log-prob pass runs under autocast: the FP8 layer's result is the same inside it."""
    codes, scale = quantize(torch.randn(32, 64), "per-channel")
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    for matmul in ("scaled_mm", "dequantize"):
        layer = Fp8Linear(codes, scale, matmul=matmul)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = layer(x)
        assert torch.equal(inside, layer(x)), matmul
