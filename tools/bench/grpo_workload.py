"""A GRPO workload as real runs have it, TRL colocate against ours: samples/s and tokens/s per trainer configuration.

Workload: `--prompts` prompts per step of `--prompt-length` random tokens, `--num-generations` completions each
(TRL's groups: every completion of a prompt shares it), completion lengths drawn, not forced, up to
`--max-completion-length`; LoRA r=32 on every linear layer of the `--model` architecture with random bf16 weights;
one generation round per optimizer step (`per_device_train_batch_size` = prompts x generations).

Drawn lengths: a random model never ends a completion at a realistic length by itself, and forcing every completion
to the maximum (`ignore_eos`, as `colocate.py` does) leaves no padding for a layout to save. Here vLLM samples with a
bias on the EOS logit (`generation_kwargs={"logit_bias": {eos: b}}`, the same in every configuration), with
`b = ln(V / --mean-completion-length)`: a random model's next-token distribution is close to uniform over its `V`
tokens, so each token ends the completion with probability about `1 / mean`, giving geometric lengths of that mean,
truncated at the maximum as TRL truncates them. The row reports the measured mean length and the share of truncated
completions, so the assumption is checked, not trusted.

Configurations (`CONFIGS`), each in its own process (vLLM's allocator state is per process):
- ``trl``: TRL 1.16 `GRPOTrainer`, colocate, sleep mode, `vllm_gpu_memory_utilization` `--trl-util` (its docs'
  colocate setting; raise it if TRL's rollout runs short of KV cache);
- ``ours``: `LongContextGRPOTrainer` with its defaults (shared weights, KV-only standby);
- ``ours-packed``, ``ours-shared-prompt``: ours with `training_layout` "packed" / "shared-prompt";
- ``ours-2x-batch``: ours with twice the prompts per step (the memory ours frees, spent on a bigger batch).

Row: s/step (median after the first step), samples/s (sequences per step / s/step), tokens/s (the step's real
tokens: prompts and completions / s/step), the split of a step into rollout / scoring / training, peak GPU memory,
the mean completion length and the truncated share.

Without CUDA (`--model tiny`): a tiny Qwen3 on vLLM's CPU build, to check the script end to end; its timings mean
nothing. There ``trl`` fails at its first weight sync (TRL loads into vLLM's CPU-repacked weights: "'Parameter'
object has no attribute 'weight_loader'"; `vllm_standby` keeps them loadable only for processes that opt in), and
TRL's sleep mode, which vLLM's CPU build refuses, is off. Checked so on CPU, 2026-12-06: the ``ours`` rows ran, with
a mean completion length of 4.4-6.9 tokens for an aimed mean of 6 (maximum 16).

Example (on the GPU, vLLM and TRL 1.16 on the path):
    python tools/bench/grpo_workload.py all --model qwen3-8b --prompts 1 --num-generations 8 --prompt-length 2048 \
        --max-completion-length 16384 --mean-completion-length 4096 --steps 3 --out docs/bench/grpo_workload.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, child_row, environment, markdown_table  # noqa: E402

CONFIGS = ("trl", "ours", "ours-packed", "ours-shared-prompt", "ours-2x-batch")
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/bench_grpo_workload"))
# The tiny CPU model: vLLM's CPU attention needs a head dim of 32, 64 or 128.
TINY = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "tie_word_embeddings": False}  # fmt: skip


def eos_logit_bias(vocab_size: int, mean_length: float) -> float:
    """The EOS logit bias that ends a completion with probability about `1 / mean_length` per token when the other
    tokens are about equally likely (module docstring)."""
    if mean_length < 1:
        raise ValueError(f"--mean-completion-length must be >= 1, got {mean_length}.")
    return math.log(vocab_size / mean_length)


def model_dir(preset: str, max_len: int) -> str:
    """A checkpoint folder: a Qwen3 of `preset`'s shape (or `TINY`), a word-level tokenizer over its whole vocabulary
    (EOS id 1), random bf16 weights (float32 for the tiny CPU model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    path = WORK / f"{preset}-{max_len}"
    if (path / "done").exists():
        return str(path)
    if preset == "tiny":
        shape, dtype = TINY, "float32"
    else:
        from trl_longctx.memory import PRESETS

        s, dtype = PRESETS[preset], "bfloat16"
        shape = {k: getattr(s, k) for k in TINY}
    config = Qwen3Config(**shape, max_position_embeddings=max_len, dtype=dtype, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, architectures=["Qwen3ForCausalLM"])  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, config.vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    del model
    (path / "done").write_text("")
    return str(path)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepSeconds:
    """Wall seconds of each optimizer step, and of the trainer methods that split it (GPU synchronized)."""

    PHASES = ("_generate_single_turn", "_generate_and_score_completions", "training_step")

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.steps: list[float] = []
        self.phases: dict[str, list[float]] = {name: [] for name in self.PHASES}
        for name in self.PHASES:
            setattr(trainer, name, self._timed(getattr(trainer, name), self.phases[name]))
        record = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                _sync()
                record.start = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                _sync()
                record.steps.append(time.perf_counter() - record.start)

        trainer.add_callback(_Callback())

    @staticmethod
    def _timed(method, seconds: list[float]):
        def timed(*args, **kwargs):
            _sync()
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                _sync()
                seconds.append(time.perf_counter() - begin)

        return timed

    def split(self) -> dict[str, float | None]:
        """Medians after the first step: rollout (vLLM), scoring (the rest of the batch preparation), training."""
        rollout, prepare, step = (self.phases[n] for n in self.PHASES)
        if not (len(rollout) == len(prepare) == len(step) and step):
            return {"rollout_s": None, "scoring_s": None, "train_s": None}
        return {
            "rollout_s": _after_first(rollout),
            "scoring_s": _after_first([p - r for p, r in zip(prepare, rollout, strict=True)]),
            "train_s": _after_first([s - p for s, p in zip(step, prepare, strict=True)]),
        }


def _after_first(values: list[float]) -> float:
    return statistics.median(values[1:] or values)


def cmd_run(args) -> dict:
    """One configuration: build its trainer, train `--steps` steps, return its row."""
    from datasets import Dataset
    from peft import LoraConfig

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    max_len = args.prompt_length + args.max_completion_length + 8
    path = model_dir(args.model, max_len)
    vocab = TINY["vocab_size"] if args.model == "tiny" else _preset_vocab(args.model)
    prompts = args.prompts * (2 if args.config == "ours-2x-batch" else 1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (max(64, 4 * prompts), args.prompt_length), generator=generator).tolist()
    dataset = Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in row) for row in ids]})
    batch = prompts * args.num_generations
    common = {
        "output_dir": str(WORK / f"run-{args.config}"), "per_device_train_batch_size": batch,
        "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
        "max_steps": args.steps, "learning_rate": 1e-5, "bf16": not on_cpu, "use_cpu": on_cpu,
        "gradient_checkpointing": True, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
        "use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": max_len, "seed": 0,
        "generation_kwargs": {"logit_bias": {1: eos_logit_bias(vocab, args.mean_completion_length)}},
    }  # fmt: skip
    lora = LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM")

    def reward(completions, **kwargs):
        return [float(len(c) % 7) for c in completions]

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args.config == "trl":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(vllm_enable_sleep_mode=not on_cpu, vllm_gpu_memory_utilization=args.trl_util, **common)
        trainer = GRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=dataset, peft_config=lora)
    else:
        from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer

        layout = {"ours-packed": "packed", "ours-shared-prompt": "shared-prompt"}.get(args.config, "padded")
        config = LongContextGRPOConfig(training_layout=layout, **common)
        trainer = LongContextGRPOTrainer(
            model=path, reward_funcs=reward, args=config, train_dataset=dataset, peft_config=lora
        )
    seconds = StepSeconds(trainer)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "completions/mean_length" in e]
    mean_length = statistics.mean(e["completions/mean_length"] for e in logs)
    s_per_step = _after_first(seconds.steps)
    return {
        "what": "grpo_workload", "config": args.config, "model": args.model, "sequences_per_step": batch,
        "prompt_length": args.prompt_length, "max_completion_length": args.max_completion_length,
        "eos_bias_for_mean": args.mean_completion_length, "mean_completion_length": mean_length,
        "truncated_share": statistics.mean(e.get("completions/clipped_ratio", 0.0) for e in logs),
        "s_per_step": s_per_step, "s_all": seconds.steps, "samples_per_s": batch / s_per_step,
        "tokens_per_s": batch * (args.prompt_length + mean_length) / s_per_step, **seconds.split(),
        "peak_allocated_GiB": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None,
        "rollout_plan": trainer.rollout_plan.describe() if hasattr(trainer, "rollout_plan") else "TRL",
    }  # fmt: skip


def _preset_vocab(preset: str) -> int:
    from trl_longctx.memory import PRESETS

    return PRESETS[preset].vocab_size


def cmd_all(args) -> None:
    """Every configuration of `--only` (default all) in its own process; rows and a table to `--out`."""
    script = str(Path(__file__).resolve())
    shared = ["--model", args.model, "--prompts", str(args.prompts), "--num-generations", str(args.num_generations),
              "--prompt-length", str(args.prompt_length), "--max-completion-length", str(args.max_completion_length),
              "--mean-completion-length", str(args.mean_completion_length), "--steps", str(args.steps),
              "--trl-util", str(args.trl_util)]  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"environment": environment(device, ("trl", "vllm", "peft")), "rows": []}
    for name in args.only or CONFIGS:
        result["rows"].append(child_row(script, ["run", "--config", name, *shared], args.timeout))
        result["table"] = table(result["rows"])
        if args.out:  # after each configuration: a run stopped part way keeps the rows it finished
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(result["table"])


def table(rows: list[dict]) -> str:
    """A markdown table of the rows, with each configuration's samples/s relative to TRL's."""
    done = [r for r in rows if "samples_per_s" in r]
    trl = next((r["samples_per_s"] for r in done if r["config"] == "trl"), None)
    lines = [[r["config"], r["sequences_per_step"], r["mean_completion_length"], r["truncated_share"], r["s_per_step"],
              r["samples_per_s"], r["tokens_per_s"], r["samples_per_s"] / trl if trl else None, r["rollout_s"],
              r["train_s"], r["peak_allocated_GiB"]] for r in done]  # fmt: skip
    failed = [[r.get("args", [None, None, "?"])[2], r.get("status")] for r in rows if "samples_per_s" not in r]
    header = ["config", "seqs/step", "mean len", "truncated", "s/step", "samples/s", "tokens/s", "x TRL",
              "rollout s", "train s", "peak GiB"]  # fmt: skip
    out = markdown_table(header, lines)
    return out + ("\n\nFailed: " + "; ".join(f"{c} ({s})" for c, s in failed) if failed else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "all"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("--config", choices=CONFIGS, required=True)
        else:
            p.add_argument("--only", nargs="*", choices=CONFIGS, help="Configurations to run (default: all).")
            p.add_argument("--timeout", type=float, default=1800, help="Seconds per configuration.")
            p.add_argument("--out", help="JSON output path.")
        p.add_argument("--model", default="qwen3-8b", help="A trl_longctx.memory.PRESETS name, or tiny (CPU).")
        p.add_argument("--prompts", type=int, default=1, help="Prompts per step (ours-2x-batch: twice as many).")
        p.add_argument("--num-generations", type=int, default=8)
        p.add_argument("--prompt-length", type=int, default=2048)
        p.add_argument("--max-completion-length", type=int, default=16384)
        p.add_argument("--mean-completion-length", type=float, default=4096,
                       help="The mean the EOS logit bias aims at (module docstring).")  # fmt: skip
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--trl-util", type=float, default=0.3, help="TRL's vllm_gpu_memory_utilization.")
    args = parser.parse_args(argv)
    if args.cmd == "all":
        cmd_all(args)
        return
    print(json.dumps(cmd_run(args)), flush=True)


if __name__ == "__main__":
    main()
