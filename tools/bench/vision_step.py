"""One GRPO training step of a vision-language model at long context, TRL's path against ours: the longest
completion each fits and the seconds per step at the lengths both fit (issue 18).

Model: Qwen3-VL-8B (`trl_longctx.memory.PRESETS["qwen3-vl-8b"]`: Qwen3-8B's text decoder with Qwen3-VL's interleaved
multimodal rotary positions, the 27-block vision tower), random bf16 weights built on the device; `--mode qlora`
puts every linear layer of the language decoder in bitsandbytes NF4 (double quantization), as `load_in_4bit` loads
it (the vision tower stays bf16). PEFT LoRA r=`--lora-rank` on every linear layer (`all-linear`: the vision tower's
too, as the recipe), gradient checkpointing (non-reentrant), bf16 autocast.

Batch: `--num-generations` sequences, each `--images` images of `--image-pixels` pixels (a square grid of 16-pixel
patches; one token per 2 x 2 patches) between `<|vision_start|>` and `<|vision_end|>`, random text tokens up to
`--prompt-length` tokens, then L random completion tokens, scored. `pixel_values` random (the vision tower's cost
does not depend on them), `image_grid_thw`, `num_images` and `mm_token_type_ids` as the processor and TRL give them.
One step = per-token log-probs, TRL's GRPO loss with `num_iterations=1` (ratio 1, random advantages), backward and
AdamW at learning rate 0 (so that every step sees the same weights).

Providers:
- ``trl``: what TRL 1.16's `GRPOTrainer._get_per_token_logps_and_entropies` runs for an image batch: the model with
  the image inputs, `labels` and `fused_lm_head=True`.
- ``ours``: what `LongContextGRPOTrainer` runs: `trl_longctx.logprob_pass.LogProbPass` over the multimodal backbone
  (`trl_longctx.vision_language`: each decoder pass with its sequences' image rows), offloaded checkpoints and MLP
  tiles on the language decoder, as the planner sizes them for the memory free now, fused log-probs.

A provider out of memory at some L is skipped at every longer L. `--memory-gib` caps the process's device memory
(`torch.cuda.set_per_process_memory_fraction`) to stand for a smaller card (24 GB: `--memory-gib 23.6`). Rows carry
the planner's prediction for the path and the step's mean log-prob (both providers score the same tokens).

`--tiny --device cpu` runs a two-layer Qwen3-VL on the CPU (the test of this script).

Example (GPU, a 24 GB budget):
    python tools/bench/vision_step.py --mode qlora --lora-rank 16 --memory-gib 23.6 \
        --lengths 4096 8192 16384 32768 --out docs/bench/vision_step_24gb.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    GIB,
    cap_device_memory,
    environment,
    free_cuda,
    is_oom,
    last_pass_sizes,
    markdown_table,
    step_status,
    timed_steps,
)
from grpo_step import quantize_decoder_linears  # noqa: E402

PROVIDERS = ("trl", "ours")
PRESET = "qwen3-vl-8b"


def vl_config(context: int):
    """Qwen3-VL-8B-Instruct's config (text decoder and vision tower of the preset, its rotary sections)."""
    import transformers

    from trl_longctx.memory import PRESETS

    s = PRESETS[PRESET]
    text = {"vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
            "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
            "num_key_value_heads": s.num_key_value_heads, "head_dim": s.head_dim,
            "max_position_embeddings": max(262144, context), "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}  # fmt: skip
    vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
              "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}  # fmt: skip
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


def build_model(args, device: torch.device, dtype: torch.dtype):
    """Random model (`--tiny`: `trl_longctx.tiny_vl_models`'), TRL's fused lm_head, NF4 decoder linears for `qlora`,
    PEFT LoRA on every linear layer, checkpointing on."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    if args.tiny:
        from trl_longctx.tiny_vl_models import build_tiny_vl_model, build_vl_tokenizer

        model = build_tiny_vl_model("qwen3_vl", build_vl_tokenizer()).to(device=device, dtype=dtype)
    else:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration._from_config(vl_config(args.prompt_length + max(args.lengths)),
                                                                 dtype=dtype)  # fmt: skip
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    if args.mode == "qlora":
        quantize_decoder_linears(model)
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                             target_modules="all-linear"))  # fmt: skip
    if args.mode == "qlora":
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
    model.enable_input_require_grads()
    model.train()
    return model


def image_batch(config, args, completion: int, device: torch.device, dtype: torch.dtype, seed: int):
    """`(input_ids, attention_mask, multimodal)` of the batch (module docstring)."""
    vision = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    side = max(2, round(math.sqrt(args.image_pixels) / vision.patch_size))
    side += side % vision.spatial_merge_size  # whole 2 x 2 merges
    patches = side * side
    image_tokens = patches // vision.spatial_merge_size**2
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    text_ids = torch.tensor([i for i in range(min(config.text_config.vocab_size, 4096)) if i not in special])
    image = [config.vision_start_token_id, *[config.image_token_id] * image_tokens, config.vision_end_token_id]
    rows = []
    for _ in range(args.num_generations):
        text = args.prompt_length + completion - args.images * len(image)
        if text < 1:
            raise ValueError(f"--prompt-length {args.prompt_length} leaves no text beside {args.images} images.")
        picks = text_ids[torch.randint(0, len(text_ids), (text,), generator=generator)].tolist()
        rows.append(image * args.images + picks)
    input_ids = torch.tensor(rows, device=device)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    images = args.num_generations * args.images
    multimodal = {
        "pixel_values": torch.randn(images * patches, patch_dim, generator=generator).to(device, dtype),
        "image_grid_thw": torch.tensor([[1, side, side]] * images, device=device),
        "num_images": [args.images] * args.num_generations,
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
    }
    return input_ids, torch.ones_like(input_ids), multimodal


class Providers:
    """The two log-prob paths over one model."""

    def __init__(self, model, args, lora_rank: int, device: torch.device, mode: str):
        from trl_longctx.logprob_pass import LogProbPass
        from trl_longctx.model_heads import decoder_and_lm_head, plain_lm_head_weights

        self.model = model
        self.head = plain_lm_head_weights(decoder_and_lm_head(model)[1])
        self.logprob_pass = LogProbPass(args, device, mode=mode, lora_rank=lora_rank)

    def logps(self, provider: str, input_ids, attention_mask, keep: int, multimodal, optimizer_states: bool):
        if provider == "trl":
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            labels[:, :-keep] = -100
            inputs = {k: v for k, v in multimodal.items() if k != "num_images"}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                             **inputs)  # fmt: skip
            return out.log_probs[:, -keep:]
        from trl_longctx.vision_language import ImageInputs, vision_parts

        parts = vision_parts(self.model, multimodal)
        self.logprob_pass.begin_try()
        logps, _, _ = self.logprob_pass(
            self.model, parts.backbone, self.head, input_ids, attention_mask, keep,
            optimizer_states_allocated=optimizer_states, images=ImageInputs(multimodal, input_ids.size(0)),
            layers=parts.language_model, vision_trained=parts.vision_trained,
        )  # fmt: skip
        return logps


def make_step(providers: Providers, provider: str, optimizer, batch, keep: int):
    """One GRPO step; returns the mean log-prob of its forward."""
    input_ids, attention_mask, multimodal = batch
    advantages = torch.randn(input_ids.size(0), 1, device=input_ids.device)
    on_cuda = input_ids.device.type == "cuda"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            logps = providers.logps(provider, input_ids, attention_mask, keep, multimodal, bool(optimizer.state))
        loss = -(torch.exp(logps - logps.detach()) * advantages).mean()
        loss.backward()
        optimizer.step()
        return logps.detach().float().mean().item()

    return step


def predicted_gib(provider: str, args, length: int, patches: int, sizes) -> float | None:
    from trl_longctx.memory import PRESETS, plan_memory
    from trl_longctx.memory.planner import TrainSetup

    if args.tiny:
        return None
    setup = TrainSetup.for_path(provider, args.num_generations, args.prompt_length, length, lora_rank=args.lora_rank,
                                mode=args.mode, vision_patches=patches, vision_trained=True,
                                grpo_mini_batch=sizes[0], tiled_mlp_chunks=sizes[1])  # fmt: skip
    return plan_memory(PRESETS[PRESET], setup).allocated / GIB


def run(args) -> list[dict]:
    from trl_longctx import LongContextGRPOConfig

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cap = cap_device_memory(device, args.memory_gib) if args.memory_gib is not None else None
    model = build_model(args, device, dtype)
    config = model.get_base_model().config
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    rows, done_oom = [], set()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer_args = LongContextGRPOConfig(output_dir=output_dir, report_to="none", bf16=device.type == "cuda",
                                             use_cpu=device.type == "cpu")  # fmt: skip
        providers = Providers(model, trainer_args, args.lora_rank, device, args.mode)
        if cap is not None:
            # The planner reads the device's free memory, which the cap does not lower: it plans for the cap instead.
            providers.logprob_pass.free_bytes = lambda: cap - torch.cuda.memory_allocated(device)
        for length in args.lengths:
            batch = image_batch(config, args, length, device, dtype, seed=length)
            patches = batch[2]["pixel_values"].size(0) // args.num_generations
            for provider in args.providers:
                row = {"provider": provider, "model": PRESET, "mode": args.mode, "L": length,
                       "B": args.num_generations, "prompt_length": args.prompt_length, "images": args.images,
                       "patches_per_sequence": patches, "memory_gib": args.memory_gib}  # fmt: skip
                if provider in done_oom:
                    rows.append({**row, "status": "skipped (OOM at a shorter L)"})
                    continue
                step = make_step(providers, provider, optimizer, batch, length)
                try:
                    count = 1 + (args.repeats if length <= args.repeat_up_to else 0)
                    timing, mean_logp = timed_steps(step, device, count)
                except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else is re-raised
                    if not is_oom(exc):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    done_oom.add(provider)
                    rows.append({**row, "status": "OOM"})
                else:
                    sizes = last_pass_sizes(providers.logprob_pass) if provider == "ours" else (None, 1)
                    if provider == "ours":
                        row["mini_batch"], row["mlp_tiles"] = sizes
                    predicted = predicted_gib(provider, args, length, patches, sizes)
                    rows.append({**row, "status": step_status(mean_logp=mean_logp), **timing, "predicted_GiB": predicted,
                                 "mean_logp": mean_logp})  # fmt: skip
                del step
                if device.type == "cuda":
                    free_cuda()
                print(json.dumps(rows[-1]), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({"env": args.env, "rows": rows}, indent=1))
            del batch
        providers.logprob_pass.offloader.release()
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=1024, help="Prompt tokens, image tokens included.")
    parser.add_argument("--images", type=int, default=1, help="Images per sequence.")
    parser.add_argument("--image-pixels", type=int, default=65536, help="Pixels per image (256 patches of 16).")
    parser.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=0, help="Timed steps after the first (which is timed apart).")
    parser.add_argument(
        "--repeat-up-to",
        type=int,
        default=1 << 30,
        help="Only lengths up to this one get --repeats; longer ones run their first step only.",
    )
    parser.add_argument("--memory-gib", type=float, help="Cap the process's device memory at this many GiB.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="A two-layer Qwen3-VL (CPU test).")
    parser.add_argument("--out", help="JSON output path (rewritten after every point).")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("vision_step.py: --device cuda needs CUDA; --tiny --device cpu runs on the CPU.")
    if args.device == "cpu" and (args.mode == "qlora" or args.memory_gib is not None):
        raise SystemExit("vision_step.py: --mode qlora and --memory-gib need --device cuda.")
    args.lengths = sorted(args.lengths)
    args.env = environment(torch.device(args.device), ("transformers", "peft", "trl"))
    rows = run(args)
    table = [[r["provider"], r["mode"], r["L"], r.get("s") if r["status"] == "ok" else r["status"], r.get("GiB"),
              r.get("predicted_GiB"), r.get("mini_batch"), r.get("mlp_tiles"), r.get("mean_logp")] for r in rows]  # fmt: skip
    print(markdown_table(["provider", "mode", "L", "step s", "peak GiB", "planner GiB", "seqs/pass", "MLP tiles",
                          "mean logp"], table))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
