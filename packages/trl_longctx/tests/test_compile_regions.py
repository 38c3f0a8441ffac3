"""Regional torch.compile of the decoder (`trl_longctx.compile_regions`): same numerics as eager with offloaded
checkpoints and tiled MLPs, bounded recompilation over sequence lengths, and one trainer step with it on.

Compiled with inductor's C++ backend on CPU. With an empty inductor cache the fast tests take about 60 s on 2 cores
(the first compile, about 40 s, builds inductor's C++ headers), about 20 s once its on-disk cache is warm; the
parametrizations that compile a graph of their own (untiled MLP, `dynamic=True`) are marked slow.
"""

import copy

import pytest
import torch
from testing_utils import VOCAB, assert_close, build_model
from torch._dynamo.utils import counters

from trl_longctx import LongContextGRPOConfig
from trl_longctx.compile_regions import COMPILE_SETTINGS, compile_decoder_layers, decoder_layers
from trl_longctx.longctx_grpo_config import COMPILE_DECODER_SETTINGS
from trl_longctx.memory import CheckpointOffloader, tile_mlps
from trl_longctx.model_heads import decoder_and_lm_head

# fp32 compiled and fp32 eager, each against a float64 eager reference (STYLE.md section 3 defaults). Inductor
# reorders and fuses the fp32 arithmetic, so the compiled error is of the same order as eager's, not bitwise equal.
TOLERANCES = {"logps": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-5, "rtol": 1e-3}}
LENGTHS = (20, 24, 31)  # three sequence lengths, as GRPO's padded completions vary from step to step


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiles() -> int:
    """Frames dynamo compiled so far (a first compile or a recompile each)."""
    return counters["frames"]["ok"]


def grpo_like_loss(model, ids, offloader, tiles, pad=True):
    """The decoder pass of `LongContextGRPOTrainer._get_per_token_logps_and_entropies`, then TRL's loss at ratio 1.

    Returns `(loss, per-token log-probs [B, 6])`.
    """
    decoder, lm_head = decoder_and_lm_head(model)
    mask = torch.ones_like(ids)
    if pad:  # left padding on one row: a 4-D attention mask enters the layers
        mask[0, :3] = 0
    keep = 6
    with offloader.offload(model), tile_mlps(model, tiles):
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    hidden = hidden[:, -keep - 1 : -1]
    # Plain log-softmax: `selective_logprobs` (not compiled, tested on its own) has no float64 reference path.
    logps = torch.log_softmax(hidden @ lm_head.weight.T, dim=-1).gather(-1, ids[:, -keep:, None]).squeeze(-1)
    advantages = torch.linspace(-1, 1, ids.size(0), dtype=logps.dtype)[:, None]
    return -(torch.exp(logps - logps.detach()) * advantages).mean(), logps


def loss_and_lora_grads(model, ids, tiles):
    model.zero_grad(set_to_none=True)
    # No padding: eager attention gives fully masked (padding) queries NaN rows in float64, which reach the others
    # as 0 * NaN through the attention weights of masked keys.
    loss, logps = grpo_like_loss(model, ids, CheckpointOffloader(), tiles, pad=False)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    return logps.detach(), grads


@pytest.mark.parametrize(
    ("setting", "tiles"),
    [("layers", 2), pytest.param("layers", 1, marks=pytest.mark.slow), ("layers-mark-dynamic", 2)],
)
def test_compiled_matches_eager_with_offload_and_tiled_mlp(setting, tiles):
    eager = build_model("qwen3", lora=True)
    reference = copy.deepcopy(eager).double()
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled, setting) == 2
    for length in LENGTHS[:2]:  # the second length runs the recompiled (dynamic) graph
        ids = torch.randint(0, VOCAB, (2, length))
        expected_logps, expected_grads = loss_and_lora_grads(reference, ids, tiles)
        for name, model in (("eager", eager), (setting, compiled)):
            logps, grads = loss_and_lora_grads(model, ids, tiles)
            assert_close(logps.double(), expected_logps, f"{name} logps, T={length}", **TOLERANCES["logps"])
            assert grads.keys() == expected_grads.keys()
            for n in grads:
                assert_close(grads[n].double(), expected_grads[n], f"{name} grad of {n}", **TOLERANCES["grads"])
    assert compiles() > 0


@pytest.mark.parametrize(
    ("setting", "tiles", "max_compiles"),
    [
        # Automatic dynamic: a static graph at the first length, one dynamic recompile at the second, then reuse.
        ("layers", 1, 2),
        pytest.param("layers-dynamic", 1, 1, marks=pytest.mark.slow),
        ("layers-mark-dynamic", 1, 1),
        # Tiled MLP: two graphs per layer around it (the second one static at first, hence one recompile).
        ("layers-mark-dynamic", 2, 3),
    ],
)
def test_recompiles_are_bounded_across_lengths(setting, tiles, max_compiles):
    model = build_model("qwen3", lora=True, layers=3)
    compile_decoder_layers(model, setting)
    offloader = CheckpointOffloader()
    for length in (*LENGTHS, LENGTHS[0]):
        grpo_like_loss(model, torch.randint(0, VOCAB, (2, length)), offloader, tiles)[0].backward()
    # All three layers share the compiled graphs (one layer class), whatever the number of lengths.
    assert 1 <= compiles() <= max_compiles, dict(counters["frames"])
    assert sum(counters["graph_break"].values()) == (1 if tiles > 1 else 0) * (compiles() > 0)


def test_tiled_mlp_does_not_recompile_per_step():
    """`tile_mlps` installs new per-layer forward objects each step; they must not be guarded on (eager region)."""
    model = build_model("qwen3", lora=True, layers=3)
    compile_decoder_layers(model, "layers")
    offloader = CheckpointOffloader()
    ids = torch.randint(0, VOCAB, (2, LENGTHS[0]))
    for _ in range(3):
        grpo_like_loss(model, ids, offloader, tiles=2)[0].backward()
    assert compiles() == 2  # the layer up to its MLP and the rest after it, shared by the three layers and steps


def test_generation_with_kv_cache_stays_eager():
    model = build_model("qwen3", lora=True).eval()
    compile_decoder_layers(model, "layers")
    with torch.no_grad():
        model.generate(torch.randint(0, VOCAB, (1, 5)), max_new_tokens=3, do_sample=False)
    assert compiles() == 0


def test_scopes_and_double_compile():
    assert compile_decoder_layers(build_model("llama", lora=True), None) == 0
    assert compile_decoder_layers(build_model("llama", lora=True), "model") == 1
    model = build_model("llama", lora=True, layers=3)
    assert compile_decoder_layers(model, "layers-dynamic") == len(decoder_layers(model)) == 3
    with pytest.raises(RuntimeError, match="already compiled"):
        compile_decoder_layers(model, "layers")


def test_unknown_setting_names_allowed_values():
    for setting in ("fast", "eager", "off"):
        with pytest.raises(
            ValueError, match=rf"must be None \(not compiled\) or one of \['layers', .*got '{setting}'"
        ):
            compile_decoder_layers(build_model("qwen3"), setting)
    with pytest.raises(ValueError, match=r"compile_decoder_layers must be None or one of \['layers', .*got 'fast'\.$"):
        LongContextGRPOConfig(output_dir="unused", compile_decoder_layers="fast", report_to="none")


@pytest.mark.parametrize("spelling", ["off", "eager"])
def test_not_compiled_has_one_spelling(spelling):
    # None is "not compiled"; the spellings once accepted beside it are refused, naming the one to write.
    message = (
        rf"compile_decoder_layers must be None or one of \['layers', .*'model'\], got '{spelling}': write None for "
        r"not compiled\.$"
    )
    with pytest.raises(ValueError, match=message):
        LongContextGRPOConfig(output_dir="unused", compile_decoder_layers=spelling, report_to="none")
    assert LongContextGRPOConfig(output_dir="unused", use_cpu=True, report_to="none").compile_decoder_layers is None


def test_config_names_match_the_registry():
    assert list(COMPILE_DECODER_SETTINGS) == list(COMPILE_SETTINGS)


def test_one_grpo_step_with_compiled_layers(tiny_model_dir, tmp_path):
    from peft import LoraConfig
    from test_longctx_grpo_trainer import make_trainer

    trainer = make_trainer(
        tiny_model_dir,
        tmp_path,
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        compile_decoder_layers="layers",
        gradient_checkpointing=True,
        offload_checkpoints=True,
        tiled_mlp_chunks=2,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert compiles() > 0  # the log-prob passes ran compiled layers (the rollout's generate ran eager)
    unchanged = [n for n, p in trainer.model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"
