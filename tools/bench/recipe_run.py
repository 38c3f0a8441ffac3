"""Run a recipe of `configs/grpo/` end to end through `longctx-grpo train`, detached, and report what it measured.

A GPU recipe's step can outlast one call to the lent machine (a 131K-token rollout decodes for many minutes), so the
run is started in its own process session and polled by later calls on the same warm machine:

    python tools/bench/recipe_run.py prepare configs/grpo/qwen3_8b_lora_long_h200.yaml --work /tmp/recipe \
        --preset qwen3-8b --steps 1
    python tools/bench/recipe_run.py launch --work /tmp/recipe
    python tools/bench/recipe_run.py poll --work /tmp/recipe --wait 540      # again until it prints "finished"
    python tools/bench/recipe_run.py report --work /tmp/recipe --out docs/bench/recipe_x.json

`prepare` writes a checkpoint folder of the recipe's architecture (a preset of the memory planner, as the model's
published config.json has it, with the YaRN scaling of its model card beyond 40,960 tokens; or `--tiny` for a CPU dry
run) and a word-level tokenizer over the whole vocabulary (a vision recipe, `task: count_squares`: Qwen3-VL-8B's
config, the tokenizer with the Qwen-VL vision tokens and the family's processor, `_vl_model_dir`; `--tiny`: a two-layer
Qwen3-VL); random bf16 weights are saved only where vLLM must read
them (4-bit recipes, quantized at load; `--weights save`), else vLLM's dummy loader draws them, the training process
redraws them as transformers initializes a model (`redraw_like_transformers`: a next-token distribution that is not
flat, so that the run's sampled-vs-trained log-prob gap means something), and the trainer's weights are views of
vLLM's. Then `run.yaml`: the recipe with only these keys changed: `model_name_or_path` (that folder), `output_dir`, `max_steps`, and
`generation_kwargs: {ignore_eos: true}` so that every completion has the recipe's full length (random weights would
stop at a random EOS), plus any `--set key=value`.

`launch` runs `trl_longctx.cli.main(["train", run.yaml])`, the function behind `longctx-grpo train`, in a process of
its own session, with timestamped INFO logs of `trl_longctx` and `vllm_standby` (the KV cache restore and release
that bracket each rollout) and a sampler thread writing, every second, the GPU memory in use on the device (the
trainer and vLLM together, `torch.cuda.mem_get_info`), the process's resident host memory and the rollout's progress
(tokens generated so far by the running vLLM requests) to `samples.csv`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30
SAMPLE_FIELDS = ("t", "gpu_used_gib", "torch_allocated_gib", "torch_reserved_gib", "rss_gib", "rollout_tokens")


# ---------------------------------------------------------------- prepare


def _published_like_config(preset: str, context: int):
    """The preset's architecture as its published config.json has it (Qwen3: `max_position_embeddings=40960`,
    `rope_theta=1e6`), with the YaRN scaling Qwen's model cards prescribe for contexts beyond 32,768 tokens (factor 4 of
    32,768: 131,072) when `context` needs it."""
    from transformers import Qwen3Config

    from trl_longctx.memory import PRESETS

    s = PRESETS[preset]
    rope = {"rope_type": "default", "rope_theta": 1e6}
    if context > 40960:
        rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    config = Qwen3Config(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, tie_word_embeddings=s.tie_word_embeddings,
        max_position_embeddings=40960, rope_parameters=rope, dtype="bfloat16", pad_token_id=0, eos_token_id=1,
        bos_token_id=None,
    )  # fmt: skip
    config.architectures = ["Qwen3ForCausalLM"]  # vLLM picks the generative runner from it
    return config


def _tiny_config():
    """A tiny Qwen3 (head dim 64, as vLLM's CPU attention needs) for a CPU dry run."""
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=40960, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    config.architectures = ["Qwen3ForCausalLM"]
    return config


def _word_tokenizer(path: Path | None, vocab_size: int, vision: bool = False):
    """A word-level tokenizer over `vocab_size` ids: `<pad>`=0, `<eos>`=1, `<unk>`=2, the built-in tasks' words
    (filler words, their instructions and letters, so that their prompts are distinct tokens), with `vision` the
    Qwen-VL chat and vision special tokens (`tokenizer.image_token` etc., as the Qwen-VL processors read them), then
    `t<i>` up to the size. Saved in `path` unless `None`; returned."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trl_longctx.tasks import COUNT_SQUARES_QUESTION, FILLER_WORDS, LETTERS
    from trl_longctx.tiny_vl_models import CHAT_TOKENS, VISION_TOKENS

    specials = [*CHAT_TOKENS, *VISION_TOKENS.values()] if vision else []
    words = ["<pad>", "<eos>", "<unk>", *FILLER_WORDS, "copy:", *LETTERS, *COUNT_SQUARES_QUESTION.split(), *specials]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    # Special tokens must not be substrings of word tokens (added tokens are matched first, anywhere in the text).
    vocab.update({f"t{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left",
        **({"extra_special_tokens": dict(VISION_TOKENS)} if vision else {}),
    )  # fmt: skip
    if specials:
        fast.add_special_tokens({"additional_special_tokens": specials})
    if path is not None:
        fast.save_pretrained(path)
    return fast


def _vl_model_dir(path: Path, context: int, weights: bool, tiny: bool) -> None:
    """A Qwen3-VL checkpoint folder for a vision recipe: Qwen3-VL-8B's config (`vision_step.vl_config`; `tiny`: the
    two-layer one of `trl_longctx.tiny_vl_models`, saved with weights), the word-level tokenizer with the vision
    tokens, the family's processor with Qwen3-VL's published image sizes (65,536 to 16,777,216 pixels), random bf16
    weights if asked."""
    import torch

    from trl_longctx.tiny_vl_models import (
        VISION_TOKENS,
        build_tiny_vl_processor,
        save_tiny_vl_checkpoint,
        save_vl_processor,
    )

    if tiny:
        save_tiny_vl_checkpoint(path, "qwen3_vl")
        (path / "done").write_text("")
        return
    from transformers import Qwen3VLForConditionalGeneration
    from vision_step import vl_config

    config = vl_config(context)
    tokenizer = _word_tokenizer(None, config.text_config.vocab_size, vision=True)
    for name, token in VISION_TOKENS.items():
        setattr(config, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
    config.text_config.pad_token_id, config.text_config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.architectures = ["Qwen3VLForConditionalGeneration"]  # vLLM picks the generative runner from it
    config.dtype = "bfloat16"
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_vl_processor(path, "qwen3_vl", build_tiny_vl_processor("qwen3_vl", tokenizer, pixels=(65536, 16777216)))
    if weights:
        _save_random_weights(path, lambda: Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16))
    (path / "done").write_text("")


def _save_random_weights(path: Path, build) -> None:
    """The model `build()` returns, with random weights (seed 0, built on the GPU when there is one), saved in `path`."""
    import torch

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = build()
    model.save_pretrained(path)


def _model_dir(path: Path, config, weights: bool) -> None:
    """Config, tokenizer and, with `weights`, random weights in the config's dtype (`_save_random_weights`) in `path`."""
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    _word_tokenizer(path, config.vocab_size)
    if weights:
        _save_random_weights(path, lambda: AutoModelForCausalLM.from_config(config, dtype=config.dtype))
    (path / "done").write_text("")


def _parse_value(text: str):
    """A `--set` value as YAML reads it (numbers, booleans, null, lists), else the string."""
    import yaml

    return yaml.safe_load(text)


def cmd_prepare(args) -> None:
    import yaml

    from trl_longctx.tasks import TASKS

    work = Path(args.work)
    model = work / "model"
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    context = recipe["vllm_max_model_length"]
    # vLLM quantizes a 4-bit recipe's checkpoint at load: that needs the weights on disk.
    weights = args.weights == "save" or recipe.get("load_in_4bit", False)
    if not (model / "done").exists() and TASKS[recipe.get("task", "copy_letter")].vision:
        _vl_model_dir(model, context, weights, args.tiny)
    elif not (model / "done").exists():
        _model_dir(model, _tiny_config() if args.tiny else _published_like_config(args.preset, context), weights)
    overrides = {
        "model_name_or_path": str(model),
        "output_dir": str(work / "run"),
        "max_steps": args.steps,
        "generation_kwargs": {"ignore_eos": True},
    }
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    changed = {k: {"recipe": recipe.get(k), "run": v} for k, v in overrides.items() if recipe.get(k) != v}
    recipe.update(overrides)
    (work / "run.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    dummy = not (model / "model.safetensors.index.json").exists() and not (model / "model.safetensors").exists()
    prepared = {"recipe": args.recipe, "changed": changed, "weights": "vllm-dummy" if dummy else "checkpoint"}
    (work / "prepared.json").write_text(json.dumps(prepared, indent=2))
    print(f"prepared {work / 'run.yaml'}; changed from the recipe: {json.dumps(changed)}")


# ---------------------------------------------------------------- launch / the training process


def cmd_ballast(args) -> None:
    """Hold the device memory above `--card-gib` (a smaller card emulated on a larger one) until killed. Unlike
    `torch.cuda.set_per_process_memory_fraction`, which only caps one process's allocator, held memory is missing from
    what every process sees free (`cudaMemGetInfo`): vLLM's start-up check, its KV-cache sizing and the trainer's
    log-prob planner all read that. `ballast.json` records the bytes held; `report` subtracts them."""
    import torch

    work = Path(args.work)
    free, total = torch.cuda.mem_get_info()
    hold = total - int(args.card_gib * GIB)
    if hold <= 0:
        raise SystemExit(f"--card-gib {args.card_gib} is not below this device's {total / GIB:.1f} GiB")
    chunks = [torch.empty(GIB, dtype=torch.uint8, device="cuda") for _ in range(hold // GIB)]
    chunks.append(torch.empty(hold % GIB, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    after, _ = torch.cuda.mem_get_info()
    (work / "ballast.json").write_text(json.dumps({
        "pid": os.getpid(), "card_gib": args.card_gib, "device_total_gib": total / GIB, "held_gib": (free - after) / GIB,
        "free_before_gib": free / GIB, "free_after_gib": after / GIB,
    }))  # fmt: skip
    while True:
        time.sleep(60)


def _start_ballast(work: Path, card_gib: float) -> None:
    """A ballast process (`cmd_ballast`) in its own session; returns once it holds its memory."""
    (work / "ballast.json").unlink(missing_ok=True)
    subprocess.Popen(
        [sys.executable, __file__, "_ballast", "--work", str(work), "--card-gib", str(card_gib)],
        stdout=open(work / "ballast.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
    )  # fmt: skip
    deadline = time.time() + 120
    while not (work / "ballast.json").exists():
        if time.time() > deadline:
            raise SystemExit(f"the ballast process did not start: {(work / 'ballast.log').read_text()}")
        time.sleep(1)
    print(f"ballast: {(work / 'ballast.json').read_text()}")


def cmd_launch(args) -> None:
    work = Path(args.work)
    for name in ("exit.json", "train.log", "samples.csv"):
        (work / name).unlink(missing_ok=True)
    if args.card_gib:
        _start_ballast(work, args.card_gib)
    log = open(work / "train.log", "w")  # noqa: SIM115 (the child keeps it)
    subprocess.Popen(
        [sys.executable, __file__, "_train", "--work", str(work)], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    (work / "launched_at").write_text(str(time.time()))
    print(f"launched; log {work / 'train.log'}")


class _Sampler(threading.Thread):
    """Every `period` seconds: GPU memory in use on the device, torch's allocated and reserved bytes (what its caching
    allocator holds: allocated plus cached blocks; the difference to the device figure is the CUDA context and memory
    allocated outside torch), resident host memory and the tokens generated so far by the vLLM requests running (0
    outside rollouts), appended to `samples.csv`."""

    def __init__(self, path: Path, period: float = 1.0):
        super().__init__(daemon=True)
        self.path, self.period, self.engines = path, period, []

    def rollout_tokens(self) -> int:
        total = 0
        for llm in self.engines:
            try:  # the in-process engine core's scheduler; read-only, racy by design (a progress figure)
                scheduler = llm.llm_engine.engine_core.engine_core.scheduler
                total += sum(r.num_output_tokens for r in list(scheduler.running))
            except Exception:
                continue
        return total

    def run(self) -> None:
        import psutil
        import torch

        process = psutil.Process()
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SAMPLE_FIELDS)
            while True:
                gpu = alloc = reserved = 0.0
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    free, total = torch.cuda.mem_get_info()
                    gpu, alloc = (total - free) / GIB, torch.cuda.memory_allocated() / GIB
                    reserved = torch.cuda.memory_reserved() / GIB
                row = (f"{time.time():.1f}", f"{gpu:.3f}", f"{alloc:.3f}", f"{reserved:.3f}",
                       f"{process.memory_info().rss / GIB:.3f}", self.rollout_tokens())  # fmt: skip
                writer.writerow(row)
                f.flush()
                time.sleep(self.period)


def redraw_like_transformers(model, std: float = 0.02, seed: int = 0) -> int:
    """Redraw a model's random weights as transformers initializes a model (`initializer_range` 0.02): parameters of
    two or more dimensions from N(0, `std`), one-dimensional ones 1 where they belong to a norm (by name), else 0.

    vLLM's dummy loader draws every parameter from U(-1e-3, 1e-3), the norms' included: hidden states and logits come
    out near 0 and the next-token distribution flat (entropy ln V), on which any two implementations agree to 1e-6,
    so a run's sampled-vs-trained log-prob gap would mean nothing. Quantized layers (any parameter not bf16/fp16/fp32:
    FP8 weights beside their float scales, say) are left as loaded, all their parameters. Returns how many parameters
    were redrawn."""
    import torch

    floats = (torch.bfloat16, torch.float16, torch.float32)
    params = list(model.named_parameters())
    quantized = {name.rpartition(".")[0] for name, param in params if param.dtype not in floats}
    redrawn = 0
    generator = None
    with torch.no_grad():
        for name, param in params:
            if name.rpartition(".")[0] in quantized:
                continue
            if param.dim() >= 2:
                if generator is None or generator.device != param.device:
                    generator = torch.Generator(param.device).manual_seed(seed)
                param.normal_(0.0, std, generator=generator)
            else:
                module, _, leaf = name.rpartition(".")
                param.fill_(1.0 if leaf == "weight" and _NORM.search(module.rsplit(".", 1)[-1].lower()) else 0.0)
            redrawn += 1
    return redrawn


_NORM = re.compile(r"norm|^ln(_|\d|$)")  # RMSNorm / LayerNorm modules: `input_layernorm`, `q_norm`, `norm1`, `ln_q`


def _redraw_worker_model(worker) -> int:
    """`redraw_like_transformers` on a vLLM worker's model (`LLM.collective_rpc`)."""
    return redraw_like_transformers(worker.model_runner.get_model())


def cmd_train(args) -> None:
    """The detached training process: logging, the sampler, then `longctx-grpo train run.yaml`."""
    import logging

    work = Path(args.work)
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.WARNING)
    for name in ("trl_longctx", "vllm_standby"):
        logging.getLogger(name).setLevel(logging.INFO)
    sampler = _Sampler(work / "samples.csv")
    import vllm

    original_init = vllm.LLM.__init__
    dummy = json.loads((work / "prepared.json").read_text())["weights"] == "vllm-dummy"

    def recording_init(self, *a, **k):  # the sampler reads the rollout's progress from each engine built
        if dummy:  # no weights in the checkpoint folder: vLLM draws random ones (as `load_format="dummy"` does)
            k["load_format"] = "dummy"
        original_init(self, *a, **k)
        if dummy:
            (redrawn,) = self.collective_rpc(_redraw_worker_model)
            logging.getLogger("trl_longctx").info(
                "recipe_run: %d dummy parameters redrawn as transformers' init", redrawn
            )
        sampler.engines.append(self)

    vllm.LLM.__init__ = recording_init
    sampler.start()
    from trl_longctx.cli import main

    result = {"rc": 0, "error": None}
    try:
        main(["train", str(work / "run.yaml")])
    except BaseException as error:  # recorded for the report, then re-raised
        result = {"rc": 1, "error": f"{type(error).__name__}: {error}"}
        raise
    finally:
        result["ended_at"] = time.time()
        (work / "exit.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- poll / report


def _samples(work: Path) -> list[dict]:
    path = work / "samples.csv"
    if not path.exists():
        return []
    with open(path) as f:
        rows = []
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(v) for k, v in row.items()})
            except (TypeError, ValueError):  # the line being written
                continue
        return rows


def _ballast(work: Path) -> dict | None:
    """What the ballast process (`launch --card-gib`) recorded, or `None` without one."""
    path = work / "ballast.json"
    return json.loads(path.read_text()) if path.exists() else None


def cmd_poll(args) -> None:
    work = Path(args.work)
    deadline = time.time() + args.wait
    while time.time() < deadline and not (work / "exit.json").exists():
        time.sleep(5)
    samples = _samples(work)
    ballast = _ballast(work)
    held = ballast["held_gib"] if ballast else 0.0
    if samples:
        last = samples[-1]
        peak = max(s["gpu_used_gib"] for s in samples) - held
        print(f"at +{last['t'] - samples[0]['t']:.0f} s: GPU used {last['gpu_used_gib'] - held:.1f} GiB "
              f"(peak {peak:.1f}{', less the ballast' if ballast else ''}), "
              f"RSS {last['rss_gib']:.1f} GiB, rollout tokens {int(last['rollout_tokens'])}")  # fmt: skip
    log = (work / "train.log").read_text(errors="replace").splitlines() if (work / "train.log").exists() else []
    print("\n".join(log[-args.lines :]))
    if (work / "exit.json").exists():
        print(f"finished: {(work / 'exit.json').read_text()}")
        if ballast:  # the run is over: give the held memory back
            import signal

            with contextlib.suppress(ProcessLookupError):
                os.kill(ballast["pid"], signal.SIGKILL)


_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\S+) \w+ (.*)$")


def _log_events(work: Path) -> list[tuple[float, str, str]]:
    """(epoch seconds, logger, message) of the timestamped log lines."""
    import datetime as dt

    events = []
    for line in (work / "train.log").read_text(errors="replace").splitlines():
        m = _LOG_TIME.search(line)  # a progress bar may precede the record on its line
        if m:
            stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
            events.append((stamp, m.group(3), m.group(4)))
    return events


def cmd_report(args) -> None:
    import torch
    from _common import environment

    work = Path(args.work)
    samples, events = _samples(work), _log_events(work)
    launched = float((work / "launched_at").read_text())
    metrics_path = work / "run" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    restores = [t for t, _, msg in events if "KV cache restored" in msg]
    releases = [t for t, _, msg in events if "KV cache released" in msg]
    rollouts = []
    for start in restores:  # each rollout runs from a restore to the next release
        end = next((t for t in releases if t > start), None)
        if end is not None:
            in_rollout = [s for s in samples if start <= s["t"] <= end]
            rollouts.append({
                "start_s": start - launched, "seconds": end - start,
                "tokens": max((int(s["rollout_tokens"]) for s in in_rollout), default=None),
                "gpu_used_peak_gib": max((s["gpu_used_gib"] for s in in_rollout), default=None),
            })  # fmt: skip
    exit_info = json.loads((work / "exit.json").read_text()) if (work / "exit.json").exists() else None
    ballast = _ballast(work)
    held = ballast["held_gib"] if ballast else 0.0
    row = {
        "what": "recipe_run",
        "prepared": json.loads((work / "prepared.json").read_text()),
        "exit": exit_info,
        "wall_s": (exit_info["ended_at"] if exit_info else time.time()) - launched,
        "rollouts": rollouts,
        "gpu_used_peak_gib": max((s["gpu_used_gib"] for s in samples), default=None),
        "ballast": ballast,  # the device-level figures include what it held: subtract "held_gib"
        "gpu_used_peak_less_ballast_gib": max((s["gpu_used_gib"] - held for s in samples), default=None),
        "torch_allocated_peak_gib": max((s["torch_allocated_gib"] for s in samples), default=None),
        "torch_reserved_peak_gib": max((s.get("torch_reserved_gib", 0.0) for s in samples), default=None),
        "rss_peak_gib": max((s["rss_gib"] for s in samples), default=None),
        "metrics": metrics,
        "plan_lines": [msg for _, name, msg in events if "rollout plan" in msg.lower() or "planner" in msg.lower()],
        **environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2))
    print(json.dumps({k: v for k, v in row.items() if k != "metrics"}, indent=2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("recipe")
    p.add_argument("--work", required=True)
    p.add_argument("--preset", default="qwen3-8b")
    p.add_argument("--tiny", action="store_true", help="a tiny random Qwen3 (CPU dry run) instead of the preset")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument(
        "--weights", choices=("dummy", "save"), default="dummy",
        help="dummy: no checkpoint weights, vLLM's dummy loader draws them (the trainer's are views of vLLM's); "
        "save: random weights saved (always for 4-bit recipes, which vLLM quantizes at load)",
    )  # fmt: skip
    p.add_argument("--set", action="append", help="key=value (YAML value) over the recipe")
    p = sub.add_parser("launch")
    p.add_argument("--work", required=True)
    p.add_argument(
        "--card-gib", type=float,
        help="emulate a card of this many GiB (as torch reports its total) on a larger one: a ballast process holds "
        "the difference; scale vllm_gpu_memory_utilization with --set at prepare (it is a share of the whole device)",
    )  # fmt: skip
    sub.add_parser("_train").add_argument("--work", required=True)
    p = sub.add_parser("_ballast")
    p.add_argument("--work", required=True)
    p.add_argument("--card-gib", type=float, required=True)
    p = sub.add_parser("poll")
    p.add_argument("--work", required=True)
    p.add_argument("--wait", type=float, default=0)
    p.add_argument("--lines", type=int, default=15)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    {
        "prepare": cmd_prepare,
        "launch": cmd_launch,
        "_train": cmd_train,
        "_ballast": cmd_ballast,
        "poll": cmd_poll,
        "report": cmd_report,
    }[args.command](args)


if __name__ == "__main__":
    main()
