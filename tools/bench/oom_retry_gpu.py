"""The out-of-memory retry on the GPU: a training step forced out of memory, rescued by the retry.

Random Qwen3-1.7B architecture (bf16, LoRA r=32 on all linear layers, gradient checkpointing), one long prompt of
`--prompt` tokens with `--num-generations` completions of `--completion` tokens, rollouts by transformers' `generate`
(no vLLM: the rollout must not be what runs out of memory). Three runs of one step each, same process, same inputs:

- ``fixed-N``: `grpo_mini_batch=N` (all sequences per decoder pass) with the retry off: the step's peak allocated
  memory after the rollout, uncapped;
- ``fixed-N/2``: the same with half of them;
- ``planned``: `grpo_mini_batch=None` (the planner sizes the pass for the free memory the device reports) and the
  retry on, with the caching allocator capped (`torch.cuda.set_per_process_memory_fraction`, applied after the rollout)
  half-way between the two peaks. The device still reports its whole free memory, so the planner picks all sequences
  per pass: the first try runs out of memory, the retry runs with half, the step completes.

Prints a markdown table and writes JSON rows (`--out`) with the retry's warning, the sizes of the try and the retry.

    python tools/bench/oom_retry_gpu.py --out docs/bench/oom_retry_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, environment, markdown_table  # noqa: E402
from colocate import WORK, model_dir  # noqa: E402


def one_step(args, name: str, mini_batch: int | None, retry: bool, cap_bytes: float | None) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer

    path = model_dir("qwen3-1.7b", args.prompt + args.completion + 64, weights=True)
    prompt = " ".join(f"t{3 + (i * 7919) % 150000}" for i in range(args.prompt))
    dataset = Dataset.from_dict({"prompt": [prompt] * 4})
    total = torch.cuda.mem_get_info()[1]

    class CappedAfterRollout(LongContextGRPOTrainer):
        """Caps the caching allocator once the rollout is done: the step's log-prob pass and backward run under it."""

        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["allocated_after_rollout_GiB"] = torch.cuda.memory_allocated() / GIB
            if cap_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
            return batch

    class Peak(TrainerCallback):
        def on_step_end(self, *a, **k):
            row["step_peak_GiB"] = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.set_per_process_memory_fraction(1.0)

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    for logger_name in ("trl_longctx.longctx_grpo_trainer", "trl_longctx.logprob_pass"):
        logging.getLogger(logger_name).addHandler(handler)
    row = {"what": "oom_retry", "run": name, "grpo_mini_batch": mini_batch, "retry_on_oom": retry,
           "cap_GiB": None if cap_bytes is None else cap_bytes / GIB, "prompt": args.prompt,
           "completion": args.completion, "sequences": args.num_generations}  # fmt: skip
    config = LongContextGRPOConfig(
        output_dir=str(WORK / f"oom-{name}"), per_device_train_batch_size=args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.completion, max_steps=1,
        learning_rate=1e-5, bf16=True, gradient_checkpointing=True, logging_steps=1, report_to="none",
        save_strategy="no", use_vllm=False, grpo_mini_batch=mini_batch, retry_on_oom=retry,
        generation_kwargs={"min_new_tokens": args.completion}, model_init_kwargs={"dtype": "bfloat16"},
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = CappedAfterRollout(
        model=path, reward_funcs=lambda completions, **kw: [float(len(c) % 5) for c in completions], args=config,
        train_dataset=dataset, peft_config=LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"),
    )  # fmt: skip
    trainer.add_callback(Peak())
    start = time.perf_counter()
    try:
        trainer.train()
        row["status"] = "ok"
    except Exception as error:  # the row records what failed; the next run still runs
        row["status"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    row["seconds"] = time.perf_counter() - start
    row["global_step"] = trainer.state.global_step
    row["loss"] = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
    row["sizes_of_last_try"] = [list(s) for s in trainer.logprob_pass.used]
    row["warnings"] = [w for w in warnings if "Out of memory" in w or "memory planner" in w]
    for logger_name in ("trl_longctx.longctx_grpo_trainer", "trl_longctx.logprob_pass"):
        logging.getLogger(logger_name).removeHandler(handler)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    n = args.num_generations
    rows = [one_step(args, f"fixed-{n}", n, retry=False, cap_bytes=None)]
    rows.append(one_step(args, f"fixed-{n // 2}", n // 2, retry=False, cap_bytes=None))
    full, half = rows[0]["step_peak_GiB"], rows[1]["step_peak_GiB"]
    cap = (full + half) / 2 * GIB
    rows.append(one_step(args, "planned", None, retry=True, cap_bytes=math.floor(cap)))
    env = environment(torch.device("cuda"), extra_dists=("trl", "transformers", "peft"))
    for row in rows:
        row.update(env)
    print(markdown_table(
        ["run", "grpo_mini_batch", "cap GiB", "status", "step peak GiB", "s", "sizes of the last try"],
        [[r["run"], r["grpo_mini_batch"], r["cap_GiB"], r["status"], r.get("step_peak_GiB"), r["seconds"],
          r["sizes_of_last_try"]] for r in rows],
    ))  # fmt: skip
    for warning in rows[-1]["warnings"]:
        print("warning:", warning)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
