"""tile_mlps on tiny random Mixture-of-Experts models (Qwen3-MoE, gpt-oss, Mixtral; CPU, fp32): the experts call is
tiled and the router is not, so transformers records the same router logits (one `[N, experts]` tensor per MoE
layer, rows in token order); logits, router logits, the aux loss and every gradient (full fine-tuning, LoRA on the
attention, LoRA on the fused expert weights through PEFT `target_parameters`) equal the untiled model's, with and
without offloaded checkpoints; the step holds one tile's expert intermediates at a time."""

import contextlib

import pytest
import torch
from testing_utils import EXPERT_INTERMEDIATE, MOE_ARCHS, NUM_EXPERTS, TOP_K, VOCAB, assert_close, build_moe_model
from torch.utils._python_dispatch import TorchDispatchMode

from trl_longctx.memory import CheckpointOffloader, tile_mlps

# fp32: tiling only changes the row count of the expert matmuls, and offloading only moves layer inputs, so the
# results agree to rounding (STYLE.md §3 defaults).
TOLERANCES = {"values": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-5, "rtol": 1e-3}}
# Weight of the aux loss in the backward: large enough for its gradient to show next to the log-likelihood's.
AUX_COEF = 10.0
# (batch, length, chunks): tiles that do not divide the 2 x 11 = 22 tokens (8, 8, 6), more tiles than tokens.
SHAPES = [(2, 11, 3), (1, 5, 8)]


def inputs(batch: int, length: int):
    input_ids = torch.randint(0, VOCAB, (batch, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : length // 3] = 0  # left padding on one row: the aux loss masks it out
    return input_ids, attention_mask, torch.randint(0, VOCAB, (batch, length))


def run_step(model, batch, chunks=1, context=None):
    """Forward in `tile_mlps(model, chunks)` (1: untiled), the backward outside it, as the trainer runs.

    Returns:
        Logits, the recorded router logits, the aux loss, the gradients, and how many modules `tile_mlps` tiled.
    """
    input_ids, attention_mask, targets = batch
    model.zero_grad()
    with context or contextlib.nullcontext(), tile_mlps(model, chunks) as tiled:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    likelihood = out.logits.double().log_softmax(-1).gather(-1, targets[..., None]).mean()
    (likelihood + AUX_COEF * out.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), tuple(r.detach() for r in out.router_logits), out.aux_loss.detach(), grads, tiled


def check_same(actual, expected, tokens: int, moe_layers: int) -> None:
    logits, router, aux, grads, _ = actual
    ref_logits, ref_router, ref_aux, ref_grads, _ = expected
    assert_close(logits, ref_logits, "logits", **TOLERANCES["values"])
    assert len(router) == len(ref_router) == moe_layers  # one tensor per MoE layer, not one per tile
    for layer, (ours, ref) in enumerate(zip(router, ref_router, strict=True)):
        assert ours.shape == (tokens, NUM_EXPERTS)
        assert_close(ours, ref, f"router logits of MoE layer {layer}", **TOLERANCES["values"])
    assert_close(aux, ref_aux, "aux loss", **TOLERANCES["values"])
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], f"grad of {name}", **TOLERANCES["grads"])


def moe_layers(model) -> int:
    return sum(type(m).__name__.endswith("TopKRouter") for m in model.modules())


@pytest.mark.parametrize(("batch", "length", "chunks"), SHAPES)
@pytest.mark.parametrize("lora", ["none", "attention", "experts"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fp32_same_outputs_router_logits_aux_loss_and_grads_as_untiled(arch, lora, batch, length, chunks):
    model = build_moe_model(arch, lora)
    data = inputs(batch, length)
    expected = run_step(model, data)
    actual = run_step(model, data, chunks)
    assert actual[4] == 2  # the experts of both layers
    check_same(actual, expected, batch * length, moe_layers(model))
    if lora == "experts":  # the adapters on both fused expert weights of both layers got their gradients
        assert sum(".experts." in n and "lora_" in n for n in actual[3]) == 2 * 2 * 2
    elif lora == "none":  # the router is trained too, through the routing weights of every tile
        assert sum(".gate." in n or ".router." in n for n in actual[3]) >= 2


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_with_offloaded_checkpoints_and_a_dense_layer(arch):
    """Three layers (Qwen3-MoE: layer 1 a dense MLP, tiled as such), LoRA on the experts, checkpoints offloaded."""
    model = build_moe_model(arch, "experts", layers=3)
    data = inputs(2, 11)
    expected = run_step(model, data)
    offloader = CheckpointOffloader()
    actual = run_step(model, data, 3, offloader.offload(model))
    assert actual[4] == 3  # Qwen3-MoE: two experts modules and one dense MLP
    assert offloader.offloaded_count == 2 and offloader.buffers_in_use == 0
    check_same(actual, expected, 22, moe_layers(model))
    untiled = run_step(model, data, 1, offloader.offload(model))
    check_same(untiled, expected, 22, moe_layers(model))


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_reentrant_checkpointing(arch):
    model = build_moe_model(arch, "attention", use_reentrant=True)
    data = inputs(2, 11)
    check_same(run_step(model, data, 4), run_step(model, data), 22, moe_layers(model))


class ExpertRows(TorchDispatchMode):
    """The most rows of any 2-D `[rows, 2 * EXPERT_INTERMEDIATE]` tensor an op allocates (the experts' gate/up output,
    its gradient) while the mode is on; views and in-place results (a transposed weight) are not allocations."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[-1] == 2 * EXPERT_INTERMEDIATE:
                self.largest = max(self.largest, tensor.shape[0])
        return out


@pytest.mark.parametrize("lora", ["none", "experts"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_the_step_holds_one_tile_of_expert_rows(arch, lora):
    # 2 x 20 tokens in 4 tiles of 10: untiled the experts work on 40 x TOP_K rows at once, tiled on 10 x TOP_K, in
    # the forward and in the backward's recompute.
    model, data = build_moe_model(arch, lora), inputs(2, 20)
    for chunks, rows in ((1, 40 * TOP_K), (4, 10 * TOP_K)):
        with ExpertRows() as tracker:
            run_step(model, data, chunks)
        assert tracker.largest == rows, (chunks, tracker.largest)


def test_experts_called_otherwise_are_refused():
    model = build_moe_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    with tile_mlps(model, 2), pytest.raises(ValueError, match=r"Qwen3MoeExperts was called with .* keywords"):
        experts(torch.zeros(4, 32), top_k_index=torch.zeros(4, TOP_K, dtype=torch.long))


def test_automatic_tiles_count_the_experts_rows(monkeypatch):
    """`tile_mlps(model, None)`: an experts call is sized like an MLP of intermediate size `k * I_e`."""
    from trl_longctx.memory import tiled_mlp

    seen = []
    monkeypatch.setattr(tiled_mlp, "auto_mlp_chunks", lambda *args: seen.append(args) or 2)
    model = build_moe_model("gpt_oss")
    data = inputs(2, 11)
    check_same(run_step(model, data, None), run_step(model, data), 22, 2)
    assert (22, 32, TOP_K * EXPERT_INTERMEDIATE) in seen
