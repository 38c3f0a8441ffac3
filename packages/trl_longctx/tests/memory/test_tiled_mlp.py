"""tile_mlps on tiny random Llama, Qwen2, Qwen3, Mistral, Gemma2 and Gemma3 models (CPU): same loss and gradients
as the untiled MLP, originals restored, and a backward whose largest `[*, intermediate]` tensors are one tile's."""

import contextlib
import copy
import functools
import math
import weakref

import pytest
import torch
from testing_utils import HIDDEN, INTERMEDIATE, VOCAB, assert_close, build_model
from torch.utils._python_dispatch import TorchDispatchMode

from trl_longctx.memory import CheckpointOffloader, auto_mlp_chunks, tile_mlps, tiled_forward

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"]
# fp32: tiling only changes the row count of the MLP matmuls, so the results agree to rounding (STYLE.md §3 defaults).
FP32 = {"values": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-5, "rtol": 1e-3}}
# bf16: max error against the float64 reference <= factor x that of the untiled bf16 model + slack (STYLE.md §3).
BF16 = {"values": {"factor": 2.0, "slack": 1e-3}, "grads": {"factor": 2.0, "slack": 1e-2}}
# (batch, sequence length, chunks): chunks that do not divide the 2 x 11 = 22 tokens (tiles of 8, 8, 6 and of
# 5, 5, 5, 5, 2), more chunks than tokens, and single-token sequences (one token: the untiled path).
SHAPES = [(2, 11, 3), (2, 11, 5), (1, 11, 4), (2, 1, 4), (1, 1, 4)]


def run_step(model, input_ids, targets, chunks=1, context=None):
    """Forward in `tile_mlps(model, chunks)` (1: untiled), then the backward outside it, as the trainer runs."""
    model.zero_grad()
    with context or contextlib.nullcontext(), tile_mlps(model, chunks):
        logits = model(input_ids=input_ids).logits
    loss = logits.double().log_softmax(-1).gather(-1, targets[..., None]).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def inputs(batch: int, length: int):
    return torch.randint(0, VOCAB, (batch, length)), torch.randint(0, VOCAB, (batch, length))


def check_same(actual, expected) -> None:
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = actual, expected
    assert_close(loss, ref_loss, "loss", **FP32["values"])
    assert_close(logits, ref_logits, "logits", **FP32["values"])
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], name, **FP32["grads"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("batch", "length", "chunks"), SHAPES)
def test_fp32_same_loss_and_grads_as_untiled(arch, lora, batch, length, chunks):
    model = build_model(arch, lora)
    input_ids, targets = inputs(batch, length)
    expected = run_step(model, input_ids, targets)
    actual = run_step(model, input_ids, targets, chunks)
    check_same(actual, expected)
    if lora:  # every adapter matrix of the tiled MLPs was reached
        assert sum("mlp" in n and "lora_" in n for n in actual[2]) == 2 * 3 * 2


def assert_error_within(actual, baseline, reference, what: str, factor: float, slack: float) -> None:
    """Max |actual - reference| <= factor x max |baseline - reference| + slack; on failure, say where and how much."""
    error = (actual.double() - reference).abs()
    bound = factor * (baseline.double() - reference).abs().max().item() + slack
    worst = error.argmax().item() if error.numel() else 0
    assert error.numel() == 0 or error.max().item() <= bound, (
        f"{what}: max abs error {error.max().item():.3g} at flat index {worst}, allowed {bound:.3g}"
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_error_within_untiled_error(arch, lora):
    model = build_model(arch, lora)
    input_ids, targets = inputs(2, 11)
    reference = run_step(copy.deepcopy(model).double(), input_ids, targets)
    bf16 = model.to(torch.bfloat16)
    baseline = run_step(bf16, input_ids, targets)
    tiled = run_step(bf16, input_ids, targets, chunks=3)
    for index, what in enumerate(("logits", "loss")):
        assert_error_within(tiled[index], baseline[index], reference[index], what, **BF16["values"])
    assert tiled[2].keys() == reference[2].keys()
    for name, grad in tiled[2].items():
        assert_error_within(grad, baseline[2][name], reference[2][name], name, **BF16["grads"])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_autocast_lora_error_within_untiled_error(arch):
    """The trainer's setting: fp32 adapters under bf16 autocast, backward (and recompute) after the autocast block."""
    model = build_model(arch, lora=True)
    input_ids, targets = inputs(2, 11)
    reference = run_step(copy.deepcopy(model).double(), input_ids, targets)
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    baseline = run_step(model, input_ids, targets, context=autocast())
    tiled = run_step(model, input_ids, targets, chunks=3, context=autocast())
    for index, what in enumerate(("logits", "loss")):
        assert_error_within(tiled[index], baseline[index], reference[index], what, **BF16["values"])
    for name, grad in tiled[2].items():
        assert_error_within(grad, baseline[2][name], reference[2][name], name, **BF16["grads"])


def test_reentrant_checkpointing_and_offloaded_checkpoints():
    input_ids, targets = inputs(2, 11)
    model = build_model("qwen3", lora=True, use_reentrant=True)
    check_same(run_step(model, input_ids, targets, 4), run_step(model, input_ids, targets))
    model = build_model("llama", lora=True, layers=3)
    expected = run_step(model, input_ids, targets)
    offloader = CheckpointOffloader()
    check_same(run_step(model, input_ids, targets, 3, offloader.offload(model)), expected)
    assert offloader.offloaded_count == 2 and offloader.buffers_in_use == 0
    # Entered the other way round, the two wrappers of the checkpointing function still unwind in order.
    check_same(run_step(model, input_ids, targets, 1, _reversed(model, offloader)), expected)


@contextlib.contextmanager
def _reversed(model, offloader):
    with tile_mlps(model, 3), offloader.offload(model):
        yield


def test_originals_restored_and_nesting_refused():
    model = build_model("gemma2", lora=True)
    mlps = [m for m in model.modules() if type(m).__name__ == "Gemma2MLP"]
    layers = [m for m in model.modules() if "_gradient_checkpointing_func" in m.__dict__]
    checkpoint_funcs = [layer._gradient_checkpointing_func for layer in layers]
    sentinel = mlps[0].forward
    mlps[0].forward = sentinel  # an instance-level forward (as accelerate's hooks install) comes back as it was
    with tile_mlps(model, 2) as tiled:
        assert tiled == len(mlps) == 2
        assert all("forward" in m.__dict__ for m in mlps)
        with pytest.raises(RuntimeError, match="already active"), tile_mlps(model, 2):
            pass
    with pytest.raises(KeyError), tile_mlps(model, 2):
        raise KeyError("the block failed")
    assert mlps[0].__dict__["forward"] is sentinel and "forward" not in mlps[1].__dict__
    assert [layer._gradient_checkpointing_func for layer in layers] == checkpoint_funcs
    with tile_mlps(model, 1) as tiled:  # one chunk: nothing is touched
        assert tiled == 0 and "forward" not in mlps[1].__dict__


@pytest.mark.parametrize("chunks", [0, -2, 1.5, True, "4"])
def test_invalid_chunks(chunks):
    with pytest.raises(ValueError, match="chunks must be"), tile_mlps(build_model("llama"), chunks):
        pass


def test_model_without_mlp():
    with pytest.raises(ValueError, match="has no MLP"), tile_mlps(torch.nn.Linear(2, 2), 2):
        pass
    with tile_mlps(torch.nn.Linear(2, 2), None) as tiled:  # automatic: a warning, nothing tiled
        assert tiled == 0


def test_auto_chunks():
    # Qwen3-8B: H = 4,096, I = 12,288. Off while one [N, I] tensor is under 2**27 elements, then tiles no larger than
    # the hidden state [N, H] or 2**27 elements, whichever is larger.
    assert [auto_mlp_chunks(n, 4096, 12288) for n in (1, 8192, 10922, 16384, 32768, 131072)] == [1, 1, 1, 2, 3, 3]
    # Qwen3-0.6B: H = 1,024, I = 3,072: 256 MiB per [N, I] tensor only from 43,691 tokens on.
    assert [auto_mlp_chunks(n, 1024, 3072) for n in (43690, 43691, 65536, 131072)] == [1, 2, 2, 3]
    model = build_model("qwen3")
    input_ids, targets = inputs(2, 11)
    check_same(run_step(model, input_ids, targets, None), run_step(model, input_ids, targets))


def test_tiled_forward_shapes():
    layer = torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, INTERMEDIATE), torch.nn.GELU(), torch.nn.Linear(INTERMEDIATE, 8)
    )
    x = torch.randn(3, 7, HIDDEN)
    for chunks in (1, 2, 4, 21, 50):
        assert_close(tiled_forward(layer, x, chunks), layer(x), f"chunks={chunks}", **FP32["values"])
    assert tiled_forward(layer, x[:, :0], 4).shape == (3, 0, 8)


class IntermediateTracker(TorchDispatchMode):
    """Rows of the largest `[..., I]` tensor created, and peak bytes of `[..., I]` storages alive at once, while the
    mode is on.

    Liveness is per storage (views share it), ended when the last tracked tensor on it is freed. Tensors shaped like
    a parameter (`[H, I]` weights, LoRA's `[r, I]`, and their gradients) are left out.
    """

    def __init__(self, model):
        super().__init__()
        self.parameter_shapes = {tuple(p.shape) for p in model.parameters()}
        self.largest_rows = self.live_bytes = self.peak_bytes = 0
        self.live: dict[int, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.shape[-1] != INTERMEDIATE:
                continue
            if tuple(tensor.shape) not in self.parameter_shapes:
                self._track(tensor)
        return out

    def _track(self, tensor):
        self.largest_rows = max(self.largest_rows, tensor.numel() // INTERMEDIATE)
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.live:
            self.live[key] = [0, storage.nbytes()]
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.live[key][0] += 1
        weakref.finalize(tensor, self._free, key)

    def _free(self, key):
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self.live[key]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_step_holds_one_tile_of_intermediates(checkpointing, lora):
    batch, length, chunks = 2, 40, 4  # 80 tokens, tiles of 20
    model = build_model("llama", lora)
    if not checkpointing:
        model.gradient_checkpointing_disable()
    input_ids, targets = inputs(batch, length)
    trackers = {}
    for tiles in (1, chunks):
        model.zero_grad()
        with IntermediateTracker(model) as tracker:
            with tile_mlps(model, tiles):
                logits = model(input_ids=input_ids).logits
            loss = logits.log_softmax(-1).gather(-1, targets[..., None]).mean()
            loss.backward()  # after the block, as in the trainer: the layers' recompute must still tile
        trackers[tiles] = tracker
    tokens, tile = batch * length, math.ceil(batch * length / chunks)
    assert trackers[1].largest_rows == tokens and trackers[chunks].largest_rows == tile
    untiled_rows, tiled_rows = (trackers[t].peak_bytes // (INTERMEDIATE * 4) for t in (1, chunks))
    # Untiled, one layer's backward holds gate, up, act(gate) and their product plus two gradients: 6 x 80 rows
    # measured with checkpointing, and 10 x 80 without (every layer's saved ones are alive from the forward on).
    # Tiled: 6 x 20 rows, one tile's, whatever the number of layers (LoRA included).
    assert untiled_rows >= 6 * tokens
    assert tiled_rows <= 6 * tile


def test_no_grad_forward_is_tiled():
    model = build_model("mistral").eval()
    with torch.no_grad(), IntermediateTracker(model) as tracker, tile_mlps(model, 5):
        model(input_ids=torch.randint(0, VOCAB, (1, 25)))
    assert tracker.largest_rows == 5


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "auto"])
def test_config_rejects_bad_tiled_mlp_chunks(value, tmp_path):
    from trl_longctx import LongContextGRPOConfig

    common = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none"}
    with pytest.raises(ValueError, match="tiled_mlp_chunks must be a positive integer or None"):
        LongContextGRPOConfig(**common, tiled_mlp_chunks=value)
    assert LongContextGRPOConfig(**common, tiled_mlp_chunks=3).tiled_mlp_chunks == 3
