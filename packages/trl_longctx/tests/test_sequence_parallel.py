"""DeepSpeed Ulysses over two CPU processes (gloo): each sequence split in two gives the unsplit pass's log-probs,
entropies and gradients.

Each rank holds its own GRPO rows (different counts, lengths, left and right padding, a fully masked completion), as
TRL's processes do. Both the split pass (`UlyssesLogProbs`, float32) and our unsplit pass (`run_log_prob_pass`,
float32) are compared with a float64 reference: the Hugging Face model with TRL's padded layout and mask, and a full
log-softmax. Gradients are summed over the ranks (what DDP reduces) before the comparison.

This file is also the worker script that torchrun runs
(`python test_sequence_parallel.py <out> <dtype> {plain,checkpointed,offloaded-tiled}`).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import run_torchrun

from trl_longctx.sequence_parallel import _own_rows, _refuse_unsupported, leave_process_group

# (dtype, log-prob/entropy tolerance, gradient tolerance) against the float64 reference: the repo's fp32 row.
TOLERANCES = [
    pytest.param("float32", {"atol": 1e-5, "rtol": 1e-4}, {"atol": 1e-5, "rtol": 1e-3}, id="fp32"),
]
VOCAB = 43
CHUNK = 5  # logit chunk of the torch backend: odd, smaller than every scored run
# Per rank: (prompt lengths, completion lengths) of its rows. Odd lengths, so some rows need a filler token; rank 1's
# last completion is fully masked (TRL's `mask_truncated_completions`), and its rows are longer than rank 0's.
ROWS = {0: ([5, 9], [7, 3]), 1: ([11, 4, 6], [2, 9, 0])}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "checkpointed", "offloaded-tiled"])
@pytest.mark.parametrize("dtype, value_tol, grad_tol", TOLERANCES)
def test_ulysses_matches_unsplit_pass_on_two_processes(tmp_path, dtype, value_tol, grad_tol, mode):
    """With gradient checkpointing the layers recompute their attention in the backward, through Ulysses too; with
    `offloaded-tiled` each decoder forward also runs with its checkpoints offloaded (`CheckpointOffloader`) and its
    MLPs in 2 tiles, attached through `decoder_context` as the trainer attaches them."""
    pytest.importorskip("deepspeed", reason="needs the [deepspeed] extra")
    result = launch(tmp_path, dtype, mode)
    for name in ("split", "unsplit"):
        for key in ("logps", "entropies"):
            assert_close(result[name][key], result["reference"][key], value_tol, f"{name} {key}")
        for param, grad in result[name]["grads"].items():
            assert_close(grad, result["reference"]["grads"][param], grad_tol, f"{name} grad {param}")
    assert result["restored"], "leaving the context did not give back the model's own attention"
    if mode == "offloaded-tiled":
        offloaded, in_use = result["offloaded"]
        assert offloaded > 0 and in_use == 0, f"{offloaded} layer inputs offloaded, {in_use} buffers still held"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    """Fail with where and by how much `actual` is off `expected` beyond `atol + rtol * |expected|`."""
    expected = expected.to(actual.dtype)
    excess = (actual - expected).abs() - (tol["atol"] + tol["rtol"] * expected.abs())
    if excess.max() > 0:
        at = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(
            f"{what}: at {at} got {actual[at].item():.8g}, expected {expected[at].item():.8g} "
            f"(|diff| {abs(actual[at] - expected[at]).item():.3g}, tolerance {tol})"
        )


@pytest.mark.parametrize("attention", ["eager", "longctx_flex"])
def test_refuses_attention_that_needs_a_mask_naming_the_setting(attention):
    from transformers import Qwen3Config

    with pytest.raises(ValueError, match=f"attn_implementation='{attention}'.*Allowed: \\['sdpa'"):
        _refuse_unsupported(Qwen3Config(num_attention_heads=2, num_key_value_heads=1), attention, 2)


def test_refuses_sliding_window_layers():
    from transformers import Qwen3Config

    config = Qwen3Config(num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window attention layers"):
        _refuse_unsupported(config, "sdpa", 2)


def test_refuses_vision_language_models():
    from transformers import Qwen2_5_VLConfig

    with pytest.raises(ValueError, match="vision-language model"):
        _refuse_unsupported(Qwen2_5_VLConfig(), "sdpa", 2)


def test_refuses_heads_not_divisible_by_group():
    from transformers import Qwen3Config

    with pytest.raises(ValueError, match="num_attention_heads=3 must be divisible by 2"):
        _refuse_unsupported(Qwen3Config(num_attention_heads=3, num_key_value_heads=3), "sdpa", 2)


def test_refuses_one_rank():
    from transformers import Qwen3Config

    with pytest.raises(ValueError, match="group of 1 rank"):
        _refuse_unsupported(Qwen3Config(num_attention_heads=2, num_key_value_heads=1), "sdpa", 1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"training_layout": "packed"},
            r"training_layout must be 'padded' with sequence_parallel_size=2, got 'packed'",
        ),
        ({"compile_decoder_layers": "layers"}, r"compile_decoder_layers must be None with sequence_parallel_size=2"),
        ({"fsdp": ["full_shard"]}, r"fsdp must be unset with sequence_parallel_size=2"),
        ({"deepspeed": "zero3.json"}, r"deepspeed must be unset with sequence_parallel_size=2"),
    ],
)
def test_config_refuses_what_does_not_compose(settings, message):
    from types import SimpleNamespace

    from trl_longctx.config_checks import _sequence_parallel_settings

    base = {"sequence_parallel_size": 2, "training_layout": "padded", "compile_decoder_layers": None, "fsdp": [],
            "deepspeed": None}  # fmt: skip
    assert _sequence_parallel_settings(SimpleNamespace(**base)) is None
    assert re.match(message, _sequence_parallel_settings(SimpleNamespace(**{**base, **settings})))


@pytest.mark.parametrize(
    ("refusal", "message"),
    [
        ("router_aux_loss", r"sequence_parallel_size=2 needs router_aux_loss_coef=0.0"),
        ("lm_head_adapter", r"sequence_parallel_size=2 needs no adapter on the lm_head"),
        ("fsdp", r"sequence_parallel_size=2 needs DDP instead of FSDP"),
        ("deepspeed", r"sequence_parallel_size=2 needs DDP instead of DeepSpeed"),
    ],
)
def test_trainer_refuses_what_does_not_compose(refusal, message):
    from types import SimpleNamespace

    from trl_longctx.sequence_parallel import sequence_parallel_pass

    refusals = dict.fromkeys(("router_aux_loss", "lm_head_adapter", "fsdp", "deepspeed"), False)
    args = SimpleNamespace(sequence_parallel_size=2)
    with pytest.raises(ValueError, match=message + r".*or set sequence_parallel_size=1\."):
        sequence_parallel_pass(args, None, None, ref_model=None, refusals={**refusals, refusal: True})
    assert sequence_parallel_pass(SimpleNamespace(sequence_parallel_size=1), None, None, ref_model=None,
                                  refusals=refusals) is None  # fmt: skip


def test_refuses_padding_inside_a_row():
    ids = torch.arange(6)[None]
    with pytest.raises(ValueError, match="Row 0: its attention mask is not one run of 1s"):
        _own_rows(ids, torch.tensor([[0, 1, 1, 0, 1, 1]]), 3)


def test_rows_keep_their_columns_and_scored_tokens():
    ids, mask = batch(*ROWS[1], seed=1)
    rows = _own_rows(ids, mask, mask.size(1) - max(ROWS[1][0]))
    assert [(r.column, r.first, r.scored) for r in rows] == [(0, 11, 2), (7, 4, 9), (5, 6, 0)]
    assert [len(r.tokens) for r in rows] == [13, 13, 6]


def batch(prompts: list[int], completions: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's layout: prompts left-padded to the longest, completions right-padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    width_p, width_c = max(prompts), max(completions)
    ids = torch.randint(4, VOCAB, (len(prompts), width_p + width_c), generator=generator)
    mask = torch.zeros_like(ids)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        mask[row, width_p - p : width_p + c] = 1
    return ids, mask


def reference(model, ids, mask, keep):
    """float64: the Hugging Face model on TRL's padded rows, with its mask, and a full log-softmax."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -keep - 1 : -1]
    logits = model.lm_head(hidden)
    logps = torch.log_softmax(logits, -1)
    chosen = logps.gather(-1, ids[:, -keep:, None])[..., 0]
    return chosen, -(logps.exp() * logps).sum(-1)


def loss_of(logps, entropies, mask, keep):
    """A GRPO-like sum over scored tokens, with per-token weights so every position's gradient is distinct."""
    scored = mask[:, -keep:].to(logps.dtype)
    weights = torch.linspace(0.5, 1.5, logps.numel(), dtype=logps.dtype).view_as(logps)
    return (logps * weights * scored).sum() + (entropies * scored).sum()


def summed_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().double().clone()
        torch.distributed.all_reduce(grad)
        grads[name] = grad
    model.zero_grad(set_to_none=True)
    return grads


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `[B_r, K_r]` rows, flattened and concatenated in rank order (ranks differ in B and K)."""
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, tensor.detach().double().flatten())
    return torch.cat(parts)


def worker(out: str, dtype_name: str, mode: str) -> None:
    import contextlib

    from trl_longctx.logprob_pass import ChunkSizes, run_log_prob_pass
    from trl_longctx.memory.offload_checkpoints import CheckpointOffloader
    from trl_longctx.memory.tiled_mlp import tile_mlps
    from trl_longctx.sequence_parallel import UlyssesLogProbs
    from trl_longctx.tiny_models import build_tiny_qwen3

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    ids, mask = batch(*ROWS[rank], seed=rank)
    keep = max(ROWS[rank][1])
    scored = mask[:, -keep:].bool()
    results = {}

    model64 = build_tiny_qwen3(VOCAB, seed=0).double()
    logps, entropies = reference(model64, ids, mask, keep)
    loss_of(logps, entropies, mask, keep).backward()
    results["reference"] = {"grads": summed_grads(model64), "logps": gathered(logps[scored]),
                            "entropies": gathered(entropies[scored])}  # fmt: skip

    model = build_tiny_qwen3(VOCAB, seed=0).to(getattr(torch, dtype_name))
    model.config._attn_implementation = "sdpa"
    if mode != "plain":
        model.gradient_checkpointing_enable()
        model.train()
    decoder_context = None
    if mode == "offloaded-tiled":
        offloader = CheckpointOffloader()

        def decoder_context():
            stack = contextlib.ExitStack()
            stack.enter_context(offloader.offload(model))
            stack.enter_context(tile_mlps(model, 2))
            return stack

    head = (model.lm_head.weight, None)
    sizes = ChunkSizes(ids.size(0), CHUNK, 1)
    logps, entropies, _ = run_log_prob_pass(
        model, model.model, head, ids, mask, keep, sizes, backend="torch", compute_entropy=True
    )
    before = logps.detach().clone()
    loss_of(logps, entropies, mask, keep).backward()
    results["unsplit"] = {"grads": summed_grads(model), "logps": gathered(logps[scored]),
                          "entropies": gathered(entropies[scored])}  # fmt: skip

    ulysses = UlyssesLogProbs(model)
    with ulysses:
        logps, entropies = ulysses(
            model.model, head, ids, mask, keep, compute_entropy=True, backend="torch", chunk_size=CHUNK,
            decoder_context=decoder_context,
        )  # fmt: skip
        loss_of(logps, entropies, mask, keep).backward()  # inside: a recompute would need the Ulysses attention
    results["split"] = {"grads": summed_grads(model), "logps": gathered(logps[scored]),
                        "entropies": gathered(entropies[scored])}  # fmt: skip
    if mode == "offloaded-tiled":  # inputs were offloaded, and every buffer came back in the backward
        results["offloaded"] = (offloader.offloaded_count, offloader.buffers_in_use)
    assert not logps[~scored].any() and not entropies[~scored].any(), "masked positions must hold 0"

    # Leaving the context gives back the model's attention: the unsplit pass computes bit for bit what it did.
    again, _, _ = run_log_prob_pass(model, model.model, head, ids, mask, keep, sizes, backend="torch")
    results["restored"] = torch.equal(again.detach(), before)
    if rank == 0:
        torch.save(results, out)
    leave_process_group()


def launch(tmp_path: Path, dtype_name: str, mode: str) -> dict:
    return run_torchrun(__file__, tmp_path / f"result-{dtype_name}-{mode}.pt", [dtype_name, mode], timeout=300)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3])
    # The work is done, saved and the process group destroyed: skip the interpreter's teardown, where gloo's threads
    # (and DeepSpeed's references to them) abort a rank now and then, after everything succeeded ("terminate called
    # without an active exception", SIGABRT; seen in CI under load). An error above still exits non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals before anything loads (`refuse_before_load`): from the checkpoint's config.json and the peft config.


def _sp_args(**overrides):
    from types import SimpleNamespace

    return SimpleNamespace(**{"sequence_parallel_size": 2, "model_init_kwargs": None, "router_aux_loss_coef": None,
                              **overrides})  # fmt: skip


def _checkpoint(tmp_path, config) -> str:
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def _qwen3(**overrides):
    from transformers import Qwen3Config

    settings = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64}  # fmt: skip
    return Qwen3Config(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("make_config", "args", "message"),
    [
        (lambda: _qwen3(use_sliding_window=True, sliding_window=8, max_window_layers=1), {}, "sliding-window"),
        (lambda: _qwen3(num_attention_heads=3, num_key_value_heads=1), {}, "num_attention_heads=3 must be divisible"),
        (lambda: _qwen3(), {"model_init_kwargs": {"attn_implementation": "eager"}}, "attn_implementation='eager'"),
        (
            lambda: __import__("transformers").Qwen3MoeConfig(
                hidden_size=64,
                intermediate_size=128,
                moe_intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=64,
                num_experts=4,
            ),  # fmt: skip
            {},
            r"needs router_aux_loss_coef=0.0",
        ),
    ],
    ids=["sliding-window", "heads", "eager", "moe-aux-loss"],
)
def test_what_the_checkpoint_decides_is_refused_before_loading(tmp_path, make_config, args, message):
    from trl_longctx.sequence_parallel import refuse_before_load

    folder = _checkpoint(tmp_path, make_config())
    with pytest.raises(ValueError, match=message):
        refuse_before_load(_sp_args(**args), folder)
    refuse_before_load(_sp_args(sequence_parallel_size=1, **args), folder)  # off: nothing to refuse


def test_before_loading_what_can_split_passes_and_what_is_not_at_hand_waits(tmp_path):
    from peft import LoraConfig

    from trl_longctx.sequence_parallel import refuse_before_load

    refuse_before_load(_sp_args(), _checkpoint(tmp_path / "dense", _qwen3()), LoraConfig(target_modules="all-linear"))
    moe = __import__("transformers").Qwen3MoeConfig(num_hidden_layers=1, num_experts=4, num_attention_heads=4,
                                                    num_key_value_heads=2, hidden_size=64)  # fmt: skip
    refuse_before_load(_sp_args(router_aux_loss_coef=0.0), _checkpoint(tmp_path / "moe", moe))  # aux loss off
    refuse_before_load(_sp_args(), str(tmp_path / "not-downloaded"))  # checked once the model is built
    with pytest.raises(ValueError, match="needs no adapter on the lm_head"):
        refuse_before_load(_sp_args(), torch.nn.Linear(2, 2), LoraConfig(target_modules=["q_proj", "lm_head"]))


def test_the_trainer_refuses_before_loading(monkeypatch, tmp_path):
    """`LongContextGRPOTrainer` calls `refuse_before_load` before any model or engine is built (the model named here
    does not exist: loading it would fail with another error)."""
    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer, longctx_grpo_trainer

    seen = []

    def refuse(args, model, peft_config=None):
        seen.append(model)
        raise ValueError("refused before loading")

    monkeypatch.setattr(longctx_grpo_trainer, "refuse_before_load", refuse)
    args = LongContextGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False)
    with pytest.raises(ValueError, match="refused before loading"):
        LongContextGRPOTrainer(model=str(tmp_path / "missing"), reward_funcs=lambda completions, **kw: [0.0],
                               args=args, train_dataset=__import__("datasets").Dataset.from_dict({"prompt": ["a"]}))  # fmt: skip
    assert seen == [str(tmp_path / "missing")]
