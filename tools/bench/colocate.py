"""vLLM standby on the GPU: memory freed, rollout throughput, one colocated GRPO step against TRL, the 32B case.

Each measurement runs in its own process (vLLM's CuMem allocator is a per-process singleton, and a "plain" engine
must not share a process with a sleep-mode one); `all` runs them one after another and writes one JSON.

- ``throughput --engine plain|standby``: Qwen3-1.7B architecture, random weights (`load_format="dummy"`), bf16;
  64 requests x 1,024 generated tokens (`ignore_eos`), tokens/s. ``standby`` is a `vllm_standby.StandbyLLM` at
  `gpu_memory_utilization=0.95`: it also records free GPU memory after `standby()` against total minus weights,
  standby/resume seconds, throughput after resume and whether greedy outputs stay identical (CUDA graphs valid).
- ``grpo --trainer trl|ours|ours-trl-config``: one process per trainer, random Qwen3-1.7B saved to disk with a word-level tokenizer
  of the full vocabulary, LoRA r=32 on all linear layers, 2 generations, prompt 256, completions forced to
  `--length` tokens, `--steps` steps; seconds per step (median after the first) and peak GPU memory. ``trl`` is
  TRL 1.16 `GRPOTrainer` colocate with `vllm_enable_sleep_mode=True` at utilization 0.3 (TRL's default);
  ``ours`` is `LongContextGRPOTrainer` with its defaults on CUDA (shared weights, KV-only standby) at 0.95;
  ``ours-trl-config`` is TRL's config (sleep mode, 0.3) with only the import changed. Each reports the GPU memory in
  use between steps as well as the peak.
- ``two-copies-32b``: TRL's colocate layout for Qwen3-32B (transformers model on the GPU, then a vLLM engine with its
  own copy): whether the engine can start at all. ``shared-32b --lengths``: one copy (vLLM's weights shared by the
  trainer, KV cache released), one training step of the policy log-probs + backward per completion length.

Example (on the GPU, vLLM 0.25 and TRL 1.16 on the path):
    python tools/bench/colocate.py all --out docs/bench/colocate_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, child_row, environment, markdown_table  # noqa: E402

PROMPT_LEN = 256
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/bench_vllm_standby"))


def qwen3_config(preset: str, max_len: int):
    from transformers import Qwen3Config

    from trl_longctx.memory import PRESETS

    s = PRESETS[preset]
    return Qwen3Config(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, tie_word_embeddings=s.tie_word_embeddings,
        max_position_embeddings=max_len, torch_dtype="bfloat16", pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip


def model_dir(preset: str, max_len: int, weights: bool) -> str:
    """A checkpoint folder: config, a word-level tokenizer over the whole vocabulary, random bf16 weights if asked.

    One folder per `max_len` (the config's `max_position_embeddings`): a folder made for a shorter context would make
    vLLM refuse a longer `max_model_len` in a later run of the same preset."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = WORK / f"{preset}-{max_len}-{'w' if weights else 'config'}"
    if (path / "done").exists():
        return str(path)
    path.mkdir(parents=True, exist_ok=True)
    config = qwen3_config(preset, max_len)
    config.architectures = ["Qwen3ForCausalLM"]  # vLLM picks the generative runner from it
    config.save_pretrained(path)
    # Special tokens must not be substrings of word tokens (added tokens are matched first, anywhere in the text).
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, config.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(path)
    if weights:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    (path / "done").write_text("")
    return str(path)


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, PROMPT_LEN), generator=g).tolist()


# ---------------------------------------------------------------- throughput


def cmd_throughput(args) -> dict:
    from vllm import LLM, SamplingParams

    path = model_dir("qwen3-1.7b", 4096, weights=False)
    common = {"model": path, "load_format": "dummy", "dtype": "bfloat16", "max_model_len": 2048, "seed": 0,
              "max_num_seqs": 64}  # fmt: skip
    total = torch.cuda.mem_get_info()[1]
    start = time.perf_counter()
    if args.engine == "plain":
        llm = LLM(gpu_memory_utilization=0.9, **common)
    else:
        from vllm_standby import StandbyLLM

        # As the trainer builds it with shared weights: LoRA on, the adapter handed in memory.
        llm = StandbyLLM(gpu_memory_utilization=0.95, enable_lora=True, max_lora_rank=32, max_loras=1, **common)
    row = {"what": "throughput", "engine": args.engine, "startup_s": time.perf_counter() - start}
    prompts = [{"prompt_token_ids": p} for p in random_prompts(64, 151936, 0)]
    sample = SamplingParams(temperature=1.0, max_tokens=1024, ignore_eos=True, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)

    def tokens_per_s(batch: int, **kwargs) -> float:
        def once() -> float:
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompts[:batch], sample, use_tqdm=False, **kwargs)
            torch.cuda.synchronize()
            return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)

        once()  # warm-up
        return statistics.median(once() for _ in range(3))

    # 64 sequences: throughput-bound; 2 sequences: the latency-bound decode of a GRPO rollout with 2 generations.
    row["tok_s"], row["tok_s_b2"] = tokens_per_s(64), tokens_per_s(2)
    if args.engine == "standby":
        from peft import LoraConfig, get_peft_model

        import vllm_standby
        from vllm_standby._worker import model_of

        before = [o.outputs[0].token_ids for o in llm.generate(prompts[:8], greedy, use_tqdm=False)]
        model = llm.collective_rpc(model_of)[0]
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        held_kv = llm.kv_cache_nbytes()
        used_before = total - torch.cuda.mem_get_info()[0]
        t = time.perf_counter()
        llm.standby()
        row["standby_s"] = time.perf_counter() - t
        free_after = torch.cuda.mem_get_info()[0]
        t = time.perf_counter()
        llm.resume()
        row["resume_s"] = time.perf_counter() - t
        after = [o.outputs[0].token_ids for o in llm.generate(prompts[:8], greedy, use_tqdm=False)]
        row.update(
            total_GiB=total / GIB, weights_GiB=weights / GIB, kv_cache_GiB=held_kv / GIB,
            used_before_standby_GiB=used_before / GIB, free_after_standby_GiB=free_after / GIB,
            gap_to_total_minus_weights_GiB=(total - weights - free_after) / GIB, greedy_identical=before == after,
            tok_s_after_resume=tokens_per_s(64),
        )  # fmt: skip
        peft_model = get_peft_model(
            vllm_standby.shared_hf_model(llm), LoraConfig(r=32, lora_alpha=64, target_modules="all-linear")
        )
        for p in peft_model.parameters():  # a non-zero adapter (PEFT starts B at zero)
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.01)
        request = vllm_standby.lora_request(peft_model)
        row["tok_s_lora"], row["tok_s_b2_lora"] = (
            tokens_per_s(64, lora_request=request),
            tokens_per_s(2, lora_request=request),
        )
    return row


# ---------------------------------------------------------------- GRPO step


class StepTimer:
    """A `TrainerCallback` recording wall seconds per optimizer step and the peak GPU memory."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                torch.cuda.synchronize()
                timer.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                torch.cuda.synchronize()
                timer.seconds.append(time.perf_counter() - timer.start)
                # Between steps: what stays on the GPU while nothing runs (weights, optimizer, vLLM in standby).
                free, total = torch.cuda.mem_get_info()
                timer.used_between_steps.append((total - free) / GIB)

        self.seconds: list[float] = []
        self.used_between_steps: list[float] = []
        self.callback = _Callback()


def cmd_grpo(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig

    from trl_longctx.memory.planner import ModelShape
    from trl_longctx.memory.rollout_kv import kv_bytes_per_token

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    path = model_dir("qwen3-1.7b", 65536, weights=True)
    texts = [" ".join(f"t{i}" for i in p) for p in random_prompts(16, 151936, 1)]
    dataset = Dataset.from_dict({"prompt": texts})
    common = {
        "output_dir": str(WORK / f"run-{args.trainer}"), "per_device_train_batch_size": 2, "num_generations": 2,
        "max_completion_length": args.length, "max_steps": args.steps, "learning_rate": 1e-5, "bf16": True,
        "gradient_checkpointing": True, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
        "use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": PROMPT_LEN + args.length + 8,
        "generation_kwargs": {"ignore_eos": True}, "seed": 0,
    }  # fmt: skip
    lora = LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM")

    def reward(completions, **kwargs):
        return [float(len(c) % 7) for c in completions]

    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.trainer in ("trl", "ours-trl-config"):
        # TRL's colocate config as its docs teach it; "ours-trl-config" changes only the import.
        if args.trainer == "trl":
            from trl import GRPOConfig, GRPOTrainer
        else:
            from trl_longctx import LongContextGRPOConfig as GRPOConfig
            from trl_longctx import LongContextGRPOTrainer as GRPOTrainer

        config = GRPOConfig(vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=0.3, **common)
        trainer = GRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=dataset, peft_config=lora)
    else:
        from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer

        config = LongContextGRPOConfig(vllm_gpu_memory_utilization=args.vllm_util or 0.95,
                                       vllm_merge_adapter=args.merge_adapter, vllm_kv_cache_sizing=args.kv_sizing,
                                       **common)  # fmt: skip
        trainer = LongContextGRPOTrainer(
            model=path, reward_funcs=reward, args=config, train_dataset=dataset, peft_config=lora
        )
    init_s = time.perf_counter() - start
    trainer.add_callback(timer.callback)
    phases = time_phases(trainer, ("_generate_single_turn", "_generate_and_score_completions", "training_step"))
    inside = RolloutParts(trainer)
    trainer.add_callback(inside.callback)
    trainer.train()
    cache = trainer.vllm_generation.llm.llm_engine.vllm_config.cache_config
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e]
    return {
        "what": "grpo_step", "trainer": args.trainer, "L": args.length, "init_s": init_s,
        "s_per_step": statistics.median(timer.seconds[1:] or timer.seconds), "s_all": timer.seconds,
        "peak_allocated_GiB": torch.cuda.max_memory_allocated() / GIB,
        "gpu_used_at_end_GiB": (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / GIB,
        "gpu_used_between_steps_GiB": statistics.median(timer.used_between_steps[1:] or timer.used_between_steps),
        "mean_completion_length": statistics.mean(lengths) if lengths else None,
        "shared_weights": getattr(trainer, "_shares_vllm_weights", False),
        "vllm_util": config.vllm_gpu_memory_utilization,
        "kv_standby": getattr(getattr(trainer, "rollout_plan", None), "kv_standby", None),
        "rollout_plan": trainer.rollout_plan.describe() if hasattr(trainer, "rollout_plan") else "TRL",
        "merge_adapter": getattr(trainer, "_adapter_merger", None) is not None,
        "kv_cache_sizing": getattr(config, "vllm_kv_cache_sizing", "utilization"),
        "kv_cache_GiB": cache.num_gpu_blocks * cache.block_size * kv_bytes_per_token(ModelShape.from_config(
            trainer.model.config)) / GIB,
        "rollout_parts_s": inside.medians(),
        # Where a step's time goes (medians after the first step). TRL nests them: `training_step` prepares its batch
        # (`_generate_and_score_completions`, which calls `_generate_single_turn`) before forward and backward. So:
        # the rollout (weight sync or merge, KV restore and release, vLLM's generation), the rest of the batch
        # preparation (TRL's old log-probs for importance sampling, rewards), and training (forward, backward).
        **_phase_split(phases),
    }  # fmt: skip


def _phase_split(phases: dict[str, list[float]]) -> dict[str, float | None]:
    rollout, prepare, step = (phases[n] for n in ("_generate_single_turn", "_generate_and_score_completions",
                                                  "training_step"))  # fmt: skip
    if not (len(rollout) == len(prepare) == len(step) and step):
        return {"rollout_s": None, "scoring_s": None, "train_s": None, "training_step_s": None}
    return {
        "rollout_s": _median_after_first(rollout),
        "scoring_s": _median_after_first([p - r for p, r in zip(prepare, rollout)]),
        "train_s": _median_after_first([s - p for s, p in zip(step, prepare)]),
        "training_step_s": _median_after_first(step),
    }


def timed_call(method, record):
    """`method` wrapped to pass the GPU-synchronized seconds of each call to `record`."""

    def timed(*args, **kwargs):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            record(time.perf_counter() - begin)

    return timed


def time_phases(trainer, names) -> dict[str, list[float]]:
    """Wrap the trainer's methods `names` (on the instance) to record the seconds of each call, GPU synchronized."""
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        setattr(trainer, name, timed_call(getattr(trainer, name), seconds[name].append))
    return seconds


class RolloutParts:
    """Seconds per step inside the rollout: vLLM's `generate`, `sleep` and `wake_up` (KV release and restore, or TRL's
    sleep mode), TRL's weight sync, the adapter merge and the copy back of the base weights (ours, merged), and
    `torch.cuda.empty_cache`. Each call is timed GPU-synchronized; a callback closes each optimizer step."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.calls: dict[str, list[float]] = {}
        self.steps: list[dict[str, float]] = []
        llm = trainer.vllm_generation.llm
        for name in ("generate", "sleep", "wake_up"):
            self._wrap(llm, name, f"vllm_{name}")
        self._wrap(trainer.vllm_generation, "sync_weights", "sync_weights")
        self._wrap(torch.cuda, "empty_cache", "empty_cache")
        merger = getattr(trainer, "_adapter_merger", None)
        if merger is not None:
            self._wrap_merger(merger)
        parts = self

        class _Callback(TrainerCallback):
            def on_step_end(self, *a, **k):
                parts.steps.append({name: sum(v) for name, v in parts.calls.items()})
                for values in parts.calls.values():
                    values.clear()

        self.callback = _Callback()

    def _record(self, key: str, seconds: float) -> None:
        self.calls.setdefault(key, []).append(seconds)

    def _wrap(self, owner, name: str, key: str) -> None:
        setattr(owner, name, timed_call(getattr(owner, name), lambda seconds: self._record(key, seconds)))

    def _wrap_merger(self, merger) -> None:
        import contextlib

        merged = merger.merged

        @contextlib.contextmanager
        def timed():
            block = merged()
            torch.cuda.synchronize()
            begin = time.perf_counter()
            block.__enter__()
            torch.cuda.synchronize()
            self._record("adapter_merge", time.perf_counter() - begin)
            try:
                yield
            finally:
                begin = time.perf_counter()
                block.__exit__(None, None, None)
                torch.cuda.synchronize()
                self._record("base_weights_restore", time.perf_counter() - begin)

        merger.merged = timed

    def medians(self) -> dict[str, float]:
        """Median per-step seconds of each part, the first step left out."""
        names = sorted({name for step in self.steps for name in step})
        return {name: _median_after_first([step.get(name, 0.0) for step in self.steps]) for name in names}


def _median_after_first(values: list[float]) -> float | None:
    return statistics.median(values[1:] or values) if values else None


# ---------------------------------------------------------------- 32B


def kv_token_capacity(llm) -> int:
    """Tokens the engine's KV cache holds (`num_gpu_blocks * block_size`): the longest rollout it can run at once."""
    cache = llm.llm_engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks * cache.block_size)


def longest_rollout(kv_tokens: int, generations: int = 2) -> int:
    """Longest completion per sequence for `generations` sequences of `PROMPT_LEN + L` tokens in `kv_tokens`."""
    return max(0, kv_tokens // generations - PROMPT_LEN)


def cmd_two_copies_32b(args) -> dict:
    """TRL's colocate layout: the trainer's model on the GPU first, then vLLM's own copy."""
    from transformers import AutoModelForCausalLM
    from vllm import LLM

    path = model_dir("qwen3-32b", 65536, weights=False)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(qwen3_config("qwen3-32b", 65536), dtype=torch.bfloat16)
    row = {"what": "32b_two_copies", "trainer_weights_GiB": torch.cuda.memory_allocated() / GIB, "attempts": []}
    for utilization in (0.3, 0.5, 0.9):
        try:
            llm = LLM(model=path, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=utilization,
                      max_model_len=4096, skip_tokenizer_init=True, enforce_eager=True)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the failure is the measurement
            row["attempts"].append({"gpu_memory_utilization": utilization, "error": str(exc)[:300]})
        else:
            kv_tokens = kv_token_capacity(llm)
            row["attempts"].append({"gpu_memory_utilization": utilization, "started": True, "kv_tokens": kv_tokens,
                                    "longest_rollout_2_sequences": longest_rollout(kv_tokens)})  # fmt: skip
            del llm
            break
    del model
    return row


def cmd_shared_32b(args) -> dict:
    """One copy: vLLM holds the weights, the trainer's model is views of them, KV cache released for training."""
    from grpo_step import ours_logps
    from peft import LoraConfig, get_peft_model

    import vllm_standby
    from trl_longctx.memory import CheckpointOffloader
    from trl_longctx.memory.planner import ModelShape, auto_chunk_sizes
    from trl_longctx.memory.rollout_kv import rollout_kv_cache_bytes

    path = model_dir("qwen3-32b", 262144, weights=False)
    max_len = PROMPT_LEN + max(args.lengths) + 8
    # As the trainer's vllm_kv_cache_sizing: "rollout" gives vLLM the KV cache of 2 sequences of max_len, the
    # utilization only caps it; "utilization" lets vLLM fill --vllm-util.
    kv = {}
    if args.kv_sizing == "rollout":
        kv_bytes = rollout_kv_cache_bytes(ModelShape.from_config(qwen3_config("qwen3-32b", 262144)), 2, max_len)
        kv = {"kv_cache_memory_bytes": kv_bytes}
    llm = vllm_standby.StandbyLLM(model=path, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=args.vllm_util,
                                  max_model_len=max_len, skip_tokenizer_init=True, enable_lora=True, max_lora_rank=32,
                                  max_loras=1, max_num_batched_tokens=4096, max_num_seqs=2, **kv)  # fmt: skip
    row = {"what": "32b_shared", "vllm_util": args.vllm_util, "kv_sizing": args.kv_sizing,
           "kv_cache_GiB": llm.kv_cache_nbytes() / GIB, "steps": []}  # fmt: skip
    row["kv_tokens"] = kv_token_capacity(llm)
    row["longest_rollout_2_sequences"] = longest_rollout(row["kv_tokens"])
    print(json.dumps({"progress": "engine", **row}), flush=True)
    llm.standby()
    model = vllm_standby.shared_hf_model(llm)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))
    model.enable_input_require_grads()
    model.train()
    row["after_standby_used_GiB"] = (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / GIB
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    offloader = CheckpointOffloader()
    shape = ModelShape.from_config(model.config)
    for length in args.lengths:
        ids = torch.randint(3, 151936, (2, PROMPT_LEN + length), device="cuda")
        # What the trainer runs: the planner's mini batch and MLP tiles for the memory free now (`LogProbPass.sizes`).
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        sizes = auto_chunk_sizes(shape, free, 2, PROMPT_LEN, length, tile_mlps=True,
                                 optimizer_states_allocated=bool(optimizer.state))  # fmt: skip
        sizes = (sizes.grpo_mini_batch, sizes.tiled_mlp_chunks) if args.planned else (None, 1)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logps = ours_logps(model, ids, torch.ones_like(ids), length, offloader, sizes)
            (-(logps.exp() * torch.randn_like(logps)).mean()).backward()
            optimizer.step()
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            row["steps"].append({"L": length, "status": "OOM", "mini_batch": sizes[0], "mlp_tiles": sizes[1]})
            break
        finally:
            logps = None
            torch.cuda.empty_cache()
        row["steps"].append({"L": length, "status": "ok", "s": time.perf_counter() - t, "mini_batch": sizes[0],
                             "mlp_tiles": sizes[1], "peak_allocated_GiB": torch.cuda.max_memory_allocated() / GIB,
                             "free_before_GiB": free / GIB})  # fmt: skip
        print(json.dumps(row["steps"][-1]), flush=True)
    offloader.release()
    # The trainer's LoRA weights and Adam states stay resident during the next rollout; the KV cache must fit beside.
    row["trainer_resident_GiB"] = torch.cuda.memory_allocated() / GIB
    t = time.perf_counter()
    try:
        llm.resume()
    except RuntimeError as exc:
        row["resume_error"] = str(exc)[:400]
    else:
        row["resume_s"] = time.perf_counter() - t
    return row


# ---------------------------------------------------------------- driver


def run_child(argv: list[str], timeout: int) -> dict:
    """Run one subcommand in a fresh process (`_common.child_row`); a finished row says `status: ok`."""
    row = child_row(__file__, argv, timeout)
    return row if "status" in row else {**row, "status": "ok"}


def cmd_all(args) -> None:
    steps = ["--length", str(args.length), "--steps", str(args.steps)]
    plan = {
        "throughput-plain": (["throughput", "--engine", "plain"], 300),
        "throughput-standby": (["throughput", "--engine", "standby"], 300),
        "grpo-trl": (["grpo", "--trainer", "trl", *steps], 600),
        "grpo-ours": (["grpo", "--trainer", "ours", *steps], 600),  # the trainer's defaults (merged on CUDA)
        "grpo-ours-lora-request": (["grpo", "--trainer", "ours", "--no-merge-adapter", *steps], 600),
        "grpo-ours-merged": (["grpo", "--trainer", "ours", "--merge-adapter", *steps], 600),
        "grpo-ours-merged-util": (
            ["grpo", "--trainer", "ours", "--merge-adapter", "--kv-sizing", "utilization", *steps],
            600,
        ),  # fmt: skip
        "two-copies-32b": (["two-copies-32b"], 300),
        "shared-32b": (["shared-32b", "--lengths", *map(str, args.lengths_32b)], 600),
    }
    unknown = sorted(set(args.only or []) - set(plan))
    if unknown:
        raise SystemExit(f"--only takes {sorted(plan)}, got {unknown}.")
    rows = []
    env = environment(torch.device("cuda"), ("vllm", "trl", "transformers", "peft"))
    for name, (argv, timeout) in plan.items():
        if args.only and name not in args.only:
            continue
        rows.append(run_child(argv, timeout))
        print(json.dumps(rows[-1])[:2000], flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(summary(rows))


def summary(rows: list[dict]) -> str:
    """Throughput and standby rows, then one line per GRPO variant with its ratio to TRL's s/step."""
    by = {r.get("engine"): r for r in rows if r.get("what") == "throughput"}
    plain, standby = by.get("plain", {}), by.get("standby", {})
    table = [
        ["rollout tok/s plain / standby / after resume", plain.get("tok_s"), standby.get("tok_s"),
         standby.get("tok_s_after_resume")],
        ["free after standby vs total - weights (GiB gap)", standby.get("free_after_standby_GiB"),
         standby.get("gap_to_total_minus_weights_GiB"), standby.get("greedy_identical")],
    ]  # fmt: skip
    out = markdown_table(["measure", "a", "b", "c"], table)
    grpo = [r for r in rows if r.get("what") == "grpo_step"]
    trl = next((r["s_per_step"] for r in grpo if r["trainer"] == "trl"), None)
    lines = []
    for r in grpo:
        name = r["trainer"] + ("-merged" if r.get("merge_adapter") else "")
        name += f" (KV {r.get('kv_cache_sizing')})" if r["trainer"] == "ours" else ""
        parts = ", ".join(f"{k} {v:.3f}" for k, v in (r.get("rollout_parts_s") or {}).items())
        lines.append([name, r["L"], r["s_per_step"], trl / r["s_per_step"] if trl else None, r.get("rollout_s"),
                      r.get("scoring_s"), r.get("train_s"), r.get("kv_cache_GiB"), parts])  # fmt: skip
    header = ["GRPO", "L", "s/step", "TRL / this", "rollout s", "scoring s", "train s", "KV GiB", "inside rollout s"]
    return out + "\n\n" + markdown_table(header, lines)


def main(argv=None) -> None:
    from trl_longctx.longctx_grpo_config import VLLM_KV_CACHE_SIZINGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--engine", choices=("plain", "standby"), required=True)
    p = sub.add_parser("grpo")
    p.add_argument("--trainer", choices=("trl", "ours", "ours-trl-config"), required=True)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--vllm-util", type=float, help="vLLM gpu_memory_utilization of ours (default 0.95).")
    p.add_argument(
        "--merge-adapter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ours: vllm_merge_adapter (--merge-adapter: rollouts on merged weights; --no-merge-adapter: vLLM's LoRA "
        "kernels; unset: the trainer's default, merged on CUDA).",
    )
    p.add_argument(
        "--kv-sizing",
        choices=VLLM_KV_CACHE_SIZINGS,
        default="rollout",
        help="ours: vllm_kv_cache_sizing (rollout: KV cache sized to the rollout; utilization: all of --vllm-util).",
    )
    sub.add_parser("two-copies-32b")
    p = sub.add_parser("shared-32b")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--vllm-util", type=float, default=0.9)
    p.add_argument(
        "--kv-sizing",
        choices=VLLM_KV_CACHE_SIZINGS,
        default="rollout",
        help="rollout: a KV cache of 2 sequences of the longest length (the trainer's default); utilization: all of "
        "--vllm-util.",
    )
    p.add_argument(
        "--planned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Mini batch and MLP tiles from the trainer's planner (--no-planned: whole batch, untiled).",
    )
    p = sub.add_parser("all")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lengths-32b", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--only", nargs="*", help="Measurements to run, by name (default: all; see cmd_all).")
    p.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("colocate.py needs CUDA.")
    if args.cmd == "all":
        return cmd_all(args)
    fn = {"throughput": cmd_throughput, "grpo": cmd_grpo, "two-copies-32b": cmd_two_copies_32b,
          "shared-32b": cmd_shared_32b}[args.cmd]  # fmt: skip
    print(json.dumps(fn(args)), flush=True)


if __name__ == "__main__":
    main()
