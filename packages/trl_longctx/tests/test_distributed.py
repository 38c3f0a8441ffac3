"""Two CPU processes (gloo) through `accelerate launch` train like one process with the same global batch, with DDP
alone and with both in one sequence-parallel group (`sequence_parallel_size=2`, when DeepSpeed is installed); and our
log-prob path under FSDP2 and DeepSpeed ZeRO-2/3 (when DeepSpeed is installed) gives one process's log-probs and
gradients.

Completions are fixed functions of (prompt, generation index, step), so both layouts see the same samples and
rewards; what differs is only how the batch is split and the gradients are reduced. The loss (with a KL term, so it
depends on the weights), the entropy and the final weights of a 2-process run must match a 1-process run.

This file is also the worker script that torchrun runs
(`python test_distributed.py <out> <model> <per-device batch> {ddp,sequence-parallel}`).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import run_torchrun

STEPS = 3
GLOBAL_BATCH = 8
NUM_GENERATIONS = 4
# fp32 on CPU; the sums over the batch are split and reduced in a different order (all-reduce of two halves vs one
# sum), so values differ by float32 rounding. Adam divides by sqrt(v), which turns a rounding-level difference of a
# near-zero gradient into a visible one: weights get 1e-3 (measured: 9e-5 with DDP), while the weights themselves
# move by about STEPS * learning_rate = 3e-2, the size of the error an unsynchronised gradient would leave.
TOLERANCES = {"loss": 1e-5, "entropy": 1e-5, "weights": 1e-3}
MIN_WEIGHT_MOVEMENT = 1e-2


def fixed_reward(completions, **kwargs):
    """A reward that only depends on the completion text."""
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


def make_trainer(model_dir: str, output_dir: str, per_device_batch: int, **overrides):
    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import make_copy_letter_dataset

    class FixedSampleTrainer(LongContextGRPOTrainer):
        """Completions drawn from (prompt, index in its group, step) instead of the policy, identical in any layout
        (the index counts rows across processes)."""

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kwargs):
            completions = []
            # The row's place in the global batch: each process holds a contiguous slice of it.
            first = self.accelerator.process_index * len(prompt_ids)
            for index, ids in enumerate(prompt_ids, start=first):
                rng = random.Random(hash((tuple(ids), index % num_generations, self.state.global_step)))
                completions.append([rng.randrange(4, 30) for _ in range(6)])
            return completions, None

    args = LongContextGRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        num_generations=NUM_GENERATIONS,
        max_completion_length=6,
        max_steps=STEPS,
        learning_rate=1e-2,
        beta=0.1,  # a KL term, so the logged loss depends on the weights after the first update
        loss_type="grpo",
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **overrides,
    )
    return FixedSampleTrainer(
        model=model_dir, reward_funcs=fixed_reward, args=args, train_dataset=make_copy_letter_dataset(64)
    )


def run(model_dir: str, output_dir: str, per_device_batch: int, **overrides) -> dict:
    """Train `STEPS` steps; return the logged curves and (on the main process) the final weights."""
    trainer = make_trainer(model_dir, output_dir, per_device_batch, **overrides)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return {
        "world_size": trainer.accelerator.num_processes,
        "wrapper": type(trainer.model_wrapped).__name__,
        "loss": [h["loss"] for h in history],
        "entropy": [h["entropy"] for h in history],
        "weights": {k: v.detach().cpu().float().clone() for k, v in (state or {}).items()},
        "trainer": trainer,
    }


def cli_worker(out: str, model_dir: str, per_device_batch: int) -> None:
    """One step of `longctx-grpo train` (`cli.main`) on test_cli's recipe with `sequence_parallel_size=2`; record
    what it leaves of the process group after it returns."""
    import torch.distributed as dist
    import yaml
    from deepspeed.sequence import layer
    from test_cli import RECIPE

    from trl_longctx.cli import main

    output_dir = Path(out).parent / "cli-run"
    recipe = Path(out).parent / f"recipe-{os.environ['RANK']}.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "model_name_or_path": model_dir, "output_dir": str(output_dir),
                                      "max_steps": 1, "per_device_train_batch_size": per_device_batch}))  # fmt: skip
    main(["train", str(recipe), "--sequence_parallel_size", "2"])
    if int(os.environ["RANK"]) == 0:  # no collective is left to take: the group is gone
        torch.save({"initialized": dist.is_initialized(), "ulysses_groups": len(layer._all_to_all_groups),
                    "summary": (output_dir / "summary.json").is_file()}, out)  # fmt: skip


def worker(out: str, model_dir: str, per_device_batch: int, mode: str) -> None:
    if mode == "cli-sequence-parallel":
        cli_worker(out, model_dir, per_device_batch)
        return
    if mode == "sequence-parallel":
        sequence_parallel_worker(out, model_dir, per_device_batch)
        return
    if mode == "trainer":  # the wrapper the environment selects (Accelerate's DeepSpeed variables), nothing else
        result = run(model_dir, str(Path(out).parent / "trainer"), per_device_batch)
        result.pop("trainer")
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(result, out)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return
    result = run(model_dir, str(Path(out).parent / "trainer"), per_device_batch)
    trainer = result.pop("trainer")
    result["fsdp2"] = fsdp2_logps_and_grads(trainer, model_dir)
    if _deepspeed_installed():
        result["zero2"], result["zero3"] = (zero_logps_and_grads(trainer, model_dir, stage) for stage in (2, 3))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, out)
    # Leave the group before exiting: a rank that exits with gloo's threads still joinable aborts ("terminate called
    # without an active exception", SIGABRT), seen once in CI after both ranks had finished their work.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def launch(tmp_path: Path, model_dir: str, env_vars: dict[str, str], mode: str = "ddp", processes: int = 2) -> dict:
    """Run `worker` in `processes` processes with torchrun, the launcher `accelerate launch` uses on GPUs; `mode`:
    `"ddp"` (then FSDP2 and ZeRO passes on the same group), `"sequence-parallel"` (`sequence_parallel_worker`) or
    `"trainer"` (the training run alone, in the wrapper `env_vars` select).

    `accelerate launch --cpu` only starts several CPU processes through `mpirun`, and refuses FSDP with `--cpu`; the
    env vars Accelerate reads (`ACCELERATE_USE_FSDP`, `FSDP_*`) select the wrapper instead, as its launcher would.
    """
    # DeepSpeed (ZeRO rows) on the CPU unless the environment names its accelerator; gloo carries its collectives.
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), **env_vars}
    return run_torchrun(__file__, tmp_path / "result.pt", [model_dir, str(GLOBAL_BATCH // processes), mode],
                        processes=processes, env=env)  # fmt: skip


def assert_same_run(two: dict, one: dict, initial: dict) -> None:
    for key in ("loss", "entropy"):
        assert len(two[key]) == len(one[key]) == STEPS
        diffs = [abs(a - b) for a, b in zip(two[key], one[key], strict=True)]
        assert max(diffs) <= TOLERANCES[key], f"{key}: 2 processes {two[key]} vs 1 process {one[key]}"
    assert two["weights"].keys() == one["weights"].keys()
    worst = max((two["weights"][k] - one["weights"][k]).abs().max().item() for k in one["weights"])
    assert worst <= TOLERANCES["weights"], f"final weights differ by up to {worst:.3g}"
    moved = max((one["weights"][k] - initial[k]).abs().max().item() for k in one["weights"])
    assert moved >= MIN_WEIGHT_MOVEMENT, f"the weights barely moved ({moved:.3g}): the comparison shows nothing"


@pytest.fixture(scope="module")
def initial_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    return run(tiny_model_dir, str(tmp_path_factory.mktemp("one")), GLOBAL_BATCH)


@pytest.fixture(scope="module")
def ddp_and_fsdp2(tiny_model_dir, tmp_path_factory):
    return launch(tmp_path_factory.mktemp("two"), tiny_model_dir, {})


@pytest.fixture(scope="module")
def one_process_fsdp2_reference(tiny_model_dir, one_process):
    from transformers import AutoModelForCausalLM

    trainer = one_process["trainer"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    input_ids, attention_mask, keep = fixed_batch(model.config.vocab_size)
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, keep, compute_entropy=True
    )
    (logps.sum() + entropies.sum()).backward()
    return {"logps": logps.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.slow
def test_ddp_two_processes_match_one(ddp_and_fsdp2, one_process, initial_weights):
    two = ddp_and_fsdp2
    assert two["world_size"] == 2 and two["wrapper"] == "DistributedDataParallel"
    assert_same_run(two, one_process, initial_weights)


def fsdp2_logps_and_grads(trainer, model_dir: str) -> dict:
    """Per-token log-probs and full gradients of our path on a `fully_shard`-ed (FSDP2) copy of the model.

    Accelerate 1.15 only selects FSDP on accelerators (`AcceleratorState` never pairs FSDP with MULTI_CPU), so the
    model is sharded here with torch's `fully_shard` over the process group the DDP run set up, as Accelerate's
    `fsdp2_prepare_model` does: each decoder layer, then the root (which holds embeddings, norm and lm_head).
    """
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    input_ids, attention_mask, keep = fixed_batch(model.config.vocab_size)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    rows = slice(rank * len(input_ids) // world, (rank + 1) * len(input_ids) // world)
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, input_ids[rows], attention_mask[rows], keep, compute_entropy=True
    )
    (logps.sum() + entropies.sum()).backward()  # FSDP2 reduce-scatters the *mean* of the ranks' gradients
    all_logps = [torch.zeros_like(logps) for _ in range(world)]
    torch.distributed.all_gather(all_logps, logps.detach().contiguous())
    grads = {n: p.grad.full_tensor() * world for n, p in model.named_parameters()}
    return {"logps": torch.cat(all_logps), "grads": grads, "sharded": type(model.lm_head.weight).__name__}


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def zero_logps_and_grads(trainer, model_dir: str, stage: int) -> dict:
    """Per-token log-probs and full gradients of our path on a DeepSpeed ZeRO-`stage` engine over the process group
    the DDP run set up (gloo; DeepSpeed's CPU accelerator), as `fsdp2_logps_and_grads` does for FSDP2.

    Accelerate 1.16 pairs DeepSpeed with accelerators only, so the engine is built here with `deepspeed.initialize`
    as Accelerate's `_prepare_deepspeed` does. Under ZeRO-3 transformers' `HfDeepSpeedConfig` is live while the model
    loads and runs (`is_deepspeed_zero3_enabled`), so the model is built partitioned (`zero.Init`) and our path
    gathers the lm_head (`trl_longctx.distributed.lm_head_gathered`); every weight outside its forward holds no
    elements. Full gradients come from `deepspeed.utils.safe_get_full_grad` before any step.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from trl_longctx.distributed import release_lm_head

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    live = HfDeepSpeedConfig(config) if stage == 3 else None  # transformers holds a weak reference to it
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        partitioned = engine.module.lm_head.weight.numel() == 0  # before the pass, as between steps
        input_ids, attention_mask, keep = fixed_batch(engine.module.config.vocab_size)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rows = slice(rank * len(input_ids) // world, (rank + 1) * len(input_ids) // world)
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            engine, input_ids[rows], attention_mask[rows], keep, compute_entropy=True
        )
        engine.backward(logps.sum() + entropies.sum())  # DeepSpeed averages the ranks' gradients, as DDP does
        all_logps = [torch.zeros_like(logps) for _ in range(world)]
        torch.distributed.all_gather(all_logps, logps.detach().contiguous())
        grads = {n: safe_get_full_grad(p) * world for n, p in engine.module.named_parameters()}
        engine.step()
        # Under ZeRO-3 the lm_head, an external parameter of the model, is still gathered after the pass; what it
        # holds must be the updated weights (a stale copy would feed the next step the old lm_head). The trainer's
        # callback then partitions it again, and the next pass gathers it anew.
        head = engine.module.lm_head.weight
        current = head.numel() == 0 or torch.equal(head.data.float(), safe_get_full_fp32_param(head))
        released = release_lm_head(engine.module) and head.numel() == 0
        with torch.no_grad():
            after, _, _ = trainer._get_per_token_logps_and_entropies(
                engine, input_ids[rows], attention_mask[rows], keep
            )
        all_after = [torch.zeros_like(after) for _ in range(world)]
        torch.distributed.all_gather(all_after, after.contiguous())
        return {"logps": torch.cat(all_logps), "grads": grads, "lm_head_partitioned": partitioned,
                "lm_head_current": current, "lm_head_released": released, "logps_after_step": torch.cat(all_after)}  # fmt: skip
    finally:
        del live


def fixed_batch(vocab_size: int, batch: int = 4, prompt: int = 5, completion: int = 7):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, prompt + completion), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding on one row
    return input_ids, attention_mask, completion


@pytest.mark.slow
def test_fsdp2_logps_and_grads_match_one_process(tiny_model_dir, ddp_and_fsdp2, one_process_fsdp2_reference):
    fsdp2 = ddp_and_fsdp2["fsdp2"]
    assert fsdp2["sharded"] == "DTensor"  # outside the forward the lm_head is a shard
    reference = one_process_fsdp2_reference
    assert torch.allclose(fsdp2["logps"], reference["logps"], atol=1e-5, rtol=1e-4)
    assert fsdp2["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert torch.allclose(fsdp2["grads"][name], grad, atol=1e-5, rtol=1e-3), f"grad of {name}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_logps_and_grads_match_one_process(stage, ddp_and_fsdp2, one_process_fsdp2_reference):
    pytest.importorskip("deepspeed")
    zero = ddp_and_fsdp2[f"zero{stage}"]
    # ZeRO-3 partitions every weight outside its module's forward: the lm_head, whose forward our path never runs,
    # is gathered for the fused pass and its backward (`trl_longctx.distributed.lm_head_gathered`).
    assert zero["lm_head_partitioned"] is (stage == 3) and zero["lm_head_current"]
    assert zero["lm_head_released"] is (stage == 3)  # `release_lm_head` acts under ZeRO-3 only
    reference = one_process_fsdp2_reference
    assert torch.allclose(zero["logps"], reference["logps"], atol=1e-5, rtol=1e-4)
    assert zero["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert torch.allclose(zero["grads"][name], grad, atol=1e-5, rtol=1e-3), f"ZeRO-{stage}: grad of {name}"


def sequence_parallel_worker(out: str, model_dir: str, per_device_batch: int) -> None:
    """Train with `sequence_parallel_size=2` (2 processes: one group; 4: ranks 0-1 and 2-3): each rank keeps its
    `per_device_batch` rows and runs half of the tokens of every row of its group, with gradient checkpointing, so
    the backward recomputes the layers through Ulysses."""
    result = run(model_dir, str(Path(out).parent / "trainer"), per_device_batch, sequence_parallel_size=2,
                 gradient_checkpointing=True)  # fmt: skip
    trainer = result.pop("trainer")
    result["attention"] = trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation
    result["restored"] = trainer.sequence_parallel is not None and not trainer.sequence_parallel._entered
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, out)
    from trl_longctx.sequence_parallel import leave_process_group

    leave_process_group()


@pytest.fixture(scope="module")
def sequence_parallel(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("deepspeed", reason="sequence parallelism needs the [deepspeed] extra")
    return launch(tmp_path_factory.mktemp("sp"), tiny_model_dir, {}, mode="sequence-parallel")


@pytest.mark.slow
def test_sequence_parallel_two_processes_match_one(sequence_parallel, one_process, initial_weights):
    """Each rank's gradient is its shards' part of both ranks' losses; DDP's average over the ranks of those parts
    is the average of the ranks' own gradients, which is what one process with the global batch takes."""
    two = sequence_parallel
    assert two["world_size"] == 2 and two["wrapper"] == "DistributedDataParallel"
    assert two["attention"] == "sdpa" and two["restored"]
    assert_same_run(two, one_process, initial_weights)


@pytest.mark.slow
def test_cli_leaves_the_process_group_after_a_sequence_parallel_run(tiny_model_dir, tmp_path):
    """`longctx-grpo train` ends a multi-process run as Accelerate asks (`end_training`): the group destroyed and
    DeepSpeed's Ulysses registry empty once `main` returns (both were left alive before), so no rank exits holding
    them. Real rollouts here: completions of at most 4 tokens after longer chat prompts, so rank 0's halves held no
    scored token (its lm_head got no gradient, and DDP left rank 1 waiting in the all-reduce until the lm_head was
    kept in every rank's graph)."""
    pytest.importorskip("deepspeed", reason="sequence parallelism needs the [deepspeed] extra")
    two = launch(tmp_path, tiny_model_dir, {}, mode="cli-sequence-parallel")
    assert two == {"initialized": False, "ulysses_groups": 0, "summary": True}


@pytest.mark.slow
def test_sequence_parallel_groups_within_four_processes_match_one(tiny_model_dir, tmp_path, one_process,
                                                                  initial_weights):  # fmt: skip
    """Two sequence-parallel groups of 2 under DDP over 4 processes (data parallel across the groups): the same run
    as one process with the global batch."""
    pytest.importorskip("deepspeed", reason="sequence parallelism needs the [deepspeed] extra")
    four = launch(tmp_path, tiny_model_dir, {}, mode="sequence-parallel", processes=4)
    assert four["world_size"] == 4 and four["restored"]
    assert_same_run(four, one_process, initial_weights)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trainer_runs_match_one_process(stage, tiny_model_dir, tmp_path, one_process, initial_weights):
    """The whole trainer under Accelerate's DeepSpeed integration (the variables `accelerate launch` sets from
    configs/accelerate/deepspeed_zero{2,3}.yaml; DeepSpeed's CPU accelerator here): 2 processes train like one."""
    pytest.importorskip("deepspeed")
    zero = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
            "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(stage == 3).lower(),
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}  # fmt: skip
    two = launch(tmp_path, tiny_model_dir, zero, mode="trainer")
    assert two["world_size"] == 2 and two["wrapper"] == "DeepSpeedEngine"
    assert_same_run(two, one_process, initial_weights)


@pytest.mark.slow
def test_zero2_and_zero3_take_the_same_step(ddp_and_fsdp2):
    # The same averaged gradients and AdamW step: the next pass (ZeRO-3's lm_head released and gathered anew) gives
    # the same log-probs under both stages, and they moved from the first pass's.
    pytest.importorskip("deepspeed")
    two, three = ddp_and_fsdp2["zero2"], ddp_and_fsdp2["zero3"]
    assert torch.allclose(three["logps_after_step"], two["logps_after_step"], atol=1e-5, rtol=1e-4)
    assert (two["logps_after_step"] - two["logps"]).abs().max() > 1e-3


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
    # The work is done, saved and the process group destroyed: skip the interpreter's teardown, where gloo's threads
    # (and DeepSpeed's references to them) abort a rank now and then, after everything succeeded ("terminate called
    # without an active exception", SIGABRT; seen in CI under load). An error above still exits non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
