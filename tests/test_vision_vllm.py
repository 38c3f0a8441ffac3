"""Vision-language models on vLLM's CPU build: shared weights, the in-memory adapter, GRPO rollouts with images.

Tiny random Qwen2.5-VL and Qwen3-VL checkpoints (`trl_longctx.tiny_vl_models.save_tiny_vl_checkpoint`), fp32:

- `vllm_standby.shared_hf_model` builds the transformers model of a vision-language engine from views of vLLM's
  tensors, the vision tower's included; it computes what a transformers model loaded from the checkpoint computes on
  an image prompt, and vLLM serves that prompt with the same log-probs;
- a PEFT LoRA adapter on every linear layer, vision tower included, reaches vLLM in memory (`lora_request`) and vLLM
  serves the adapted model's log-probs; an engine that would leave the tower's adapter weights out refuses them;
- a LoRA GRPO run on images (`count_squares`) with vLLM colocated, weights shared and the KV cache released between
  rollouts, the adapter handed over in memory or merged into the shared weights for each rollout: vLLM gets the
  images, samples from the trainer's policy, and every adapter trains; with TRL's own engine too, one step.

vLLM processes images with torchvision, which does not import beside the CPU torch wheel: these tests run in the
`vision_vllm` cell of `tools/ci/test_matrix.sh` (its environment: `ensure_vision_vllm_env` in `tools/ci/envs.sh`) and
skip elsewhere.
"""

import gc
import os

import pytest

pytest.importorskip("vllm")
pytest.importorskip("PIL")


from trl_longctx.rollout_plan import torchvision_problem  # noqa: E402

if (_problem := torchvision_problem()) is not None:
    pytest.skip(
        f"vLLM needs torchvision for vision-language models ({_problem}); the vision_vllm matrix cell runs these",
        allow_module_level=True,
    )

import torch  # noqa: E402
from conftest import DISTRIBUTED_ENV, storage_ptrs  # noqa: E402

pytestmark = pytest.mark.slow

# The shared model against a transformers model loaded from the same checkpoint: the same tensors through the same
# eager ops, so equal bit for bit. vLLM's fp32 CPU kernels against eager transformers on the same weights (seen:
# 5e-7 to 1e-6). The rollouts' sampled log-probs against the trainer's, per completion token, with the shared engine
# (seen: 5e-7) and with TRL's own (seen: 1.1e-3: TRL builds its engine without a dtype and vLLM runs this float32
# checkpoint in bf16; text models on TRL's engine show the same); when vLLM decoded from the image's run of tokens
# expanded twice: 0.03 to 0.04 on either.
TOLERANCES = {
    "shared": {"atol": 0.0, "rtol": 0.0},
    "served": {"atol": 1e-5, "rtol": 0.0},
    "sampled_gap": 1e-4,
    "trl_engine_sampled_gap": 5e-3,
}
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
PROMPT = (
    "<|im_start|>user:<|vision_start|><|image_pad|><|vision_end|>how many squares?<|im_end|><|im_start|>assistant:"
)


@pytest.fixture
def in_process_engine(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    yield
    gc.collect()


def _image():
    import random

    from trl_longctx.tasks import draw_squares

    return draw_squares(3, random.Random(0)).resize((84, 56))


def _engine(folder, **lora):
    from vllm_standby import StandbyLLM

    return StandbyLLM(model=str(folder), max_model_len=256, enforce_eager=True, dtype="float32", seed=0, **lora)


def _served_logps(llm, image, lora_request=None) -> tuple[list[int], torch.Tensor]:
    """vLLM's prompt token ids and log-probs of `PROMPT` with `image`."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    request = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    out = llm.generate([request], params, lora_request=lora_request, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    return ids, torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])


def _logits(model, processor, image) -> torch.Tensor:
    batch = processor(text=[PROMPT], images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[0].float()


def _token_logps(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_vision_language_weights_and_in_memory_adapter(family, tmp_path, in_process_engine):
    import peft
    import transformers

    from trl_longctx.tiny_vl_models import save_tiny_vl_checkpoint
    from vllm_standby import _worker, lora_request, shared_hf_model

    folder = save_tiny_vl_checkpoint(tmp_path / "model", family)
    llm = _engine(folder, enable_lora=True, max_lora_rank=8, max_loras=1, enable_tower_connector_lora=True)
    vllm_model = llm.collective_rpc(_worker.model_of)[0]
    shared = shared_hf_model(llm)
    assert isinstance(shared, getattr(transformers, shared.config.architectures[0]))

    # One copy: every weight of the transformers model, the vision tower's included, lives in vLLM's storages; the
    # tower's MLP halves are row views of vLLM's packed gate_up_proj (Qwen2.5-VL; Qwen3-VL's tower MLP is unpacked).
    assert storage_ptrs(shared.parameters()) <= storage_ptrs(vllm_model.parameters())
    assert any(n.startswith("model.visual.blocks.") for n, _ in shared.named_parameters())
    vllm_block, hf_block = vllm_model.visual.blocks[0], shared.model.visual.blocks[0]
    if family == "qwen2_5_vl":
        gate_up = vllm_block.mlp.gate_up_proj.weight
        assert hf_block.mlp.gate_proj.weight.data_ptr() == gate_up.data_ptr()
        rows = hf_block.mlp.gate_proj.weight.shape[0]
        assert hf_block.mlp.up_proj.weight.data_ptr() == gate_up.data_ptr() + rows * gate_up.stride(0) * 4
    assert hf_block.attn.qkv.weight.data_ptr() == vllm_block.attn.qkv.weight.data_ptr()
    assert not any(t.is_meta for t in (*shared.parameters(), *shared.buffers()))

    # The same model as the checkpoint's, and vLLM serves it: an image prompt's log-probs.
    processor = transformers.AutoProcessor.from_pretrained(folder)
    image = _image()
    reference = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    logits = _logits(shared, processor, image)
    torch.testing.assert_close(logits, _logits(reference, processor, image), **TOLERANCES["shared"])
    ids, served = _served_logps(llm, image)
    torch.testing.assert_close(served, _token_logps(logits, ids), **TOLERANCES["served"])

    # An adapter on every linear layer, the tower's included (nonzero B: it changes the outputs), reaches vLLM in memory.
    adapted = peft.get_peft_model(shared, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert any(".visual." in n for n, _ in adapted.named_parameters() if "lora_A" in n)
    adapted_logps = _token_logps(_logits(adapted, processor, image), ids)
    assert (adapted_logps - served).abs().max() > 1e-2  # the adapter moves the log-probs: the check below can fail
    _, served_adapted = _served_logps(llm, image, lora_request(adapted))
    torch.testing.assert_close(served_adapted, adapted_logps, **TOLERANCES["served"])


def test_engine_without_tower_lora_refuses_tower_adapter_weights(tmp_path, in_process_engine):
    """vLLM built without `enable_tower_connector_lora` would serve the adapter without its vision tower weights; the
    in-memory adapter loader refuses it instead, naming the setting (the engine is not used after: the refusal ends the
    run). An adapter on the language model only is served as PEFT computes it."""
    import peft
    import transformers

    from trl_longctx.tiny_vl_models import save_tiny_vl_checkpoint
    from vllm_standby import lora_request, shared_hf_model

    folder = save_tiny_vl_checkpoint(tmp_path / "model", "qwen2_5_vl")
    llm = _engine(folder, enable_lora=True, max_lora_rank=8, max_loras=1)
    shared = shared_hf_model(llm)
    language = peft.get_peft_model(
        shared, peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    )
    processor = transformers.AutoProcessor.from_pretrained(folder)
    ids, served = _served_logps(llm, _image(), lora_request(language))
    torch.testing.assert_close(
        served, _token_logps(_logits(language, processor, _image()), ids), **TOLERANCES["served"]
    )
    language.unload()
    tower = peft.get_peft_model(shared, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with pytest.raises(ValueError, match="vision tower or connector .* enable_tower_connector_lora=True"):
        _served_logps(llm, _image(), lora_request(tower))


def count_squares_trainer(tmp_path, family="qwen2_5_vl", **overrides):
    """Our trainer on a tiny Qwen2.5-VL checkpoint, LoRA on every linear layer, `count_squares` with vLLM colocated
    (its KV cache released between rollouts and sized to the rollout)."""
    from peft import LoraConfig

    from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer
    from trl_longctx.tasks import count_squares_reward, make_count_squares_dataset
    from trl_longctx.tiny_vl_models import save_tiny_vl_checkpoint

    def varied_reward(completions, **kwargs):  # the exact count of a random model is almost always 0: no advantage
        return [float(len(c[-1]["content"]) % 3) for c in completions]

    settings = {
        "output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4, "num_generations": 2,
        "max_completion_length": 4, "learning_rate": 5e-2, "logging_steps": 1, "report_to": "none", "use_cpu": True,
        "bf16": False, "save_strategy": "no", "disable_tqdm": True, "use_vllm": True, "vllm_mode": "colocate",
        "vllm_max_model_length": 128, "vllm_kv_standby": True,
    }  # fmt: skip
    return LongContextGRPOTrainer(
        model=str(save_tiny_vl_checkpoint(tmp_path / "model", family)),
        reward_funcs=[count_squares_reward, varied_reward],
        args=LongContextGRPOConfig(**{**settings, **overrides}),
        train_dataset=make_count_squares_dataset(8),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )


def recorded_sampling_gaps(monkeypatch) -> list[float]:
    """Each rollout's largest gap between vLLM's sampled log-probs and the trainer's, over completion tokens."""
    from trl_longctx import LongContextGRPOTrainer

    gaps = []
    score = LongContextGRPOTrainer._generate_and_score_completions

    def recording_gaps(self, *args, **kwargs):
        output = score(self, *args, **kwargs)
        gap = (output["old_per_token_logps"] - output["sampling_per_token_logps"]).abs() * output["completion_mask"]
        gaps.append(gap.max().item())
        return output

    monkeypatch.setattr(LongContextGRPOTrainer, "_generate_and_score_completions", recording_gaps)
    return gaps


@pytest.mark.parametrize(
    ("family", "merge"),
    [("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", False)],
    ids=["qwen2_5_vl-adapter-request", "qwen2_5_vl-merged", "qwen3_vl-adapter-request"],
)
def test_grpo_run_on_images_with_shared_vllm_weights(family, merge, tmp_path, in_process_engine, monkeypatch):
    from trl_longctx.vision_language import ImageInputs
    from trl_longctx.vllm_shared import AdapterStandbyLLM
    from vllm_standby import _worker, kv_cache_nbytes

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")  # the trainer sizes the KV cache to the rollout
    requests, passes = [], []
    generate, batch = AdapterStandbyLLM.generate, ImageInputs.batch

    def recording_generate(self, prompts, *args, **kwargs):
        requests.extend(prompts)
        return generate(self, prompts, *args, **kwargs)

    def recording_batch(self, *args, **kwargs):
        passes.append(1)
        return batch(self, *args, **kwargs)

    monkeypatch.setattr(AdapterStandbyLLM, "generate", recording_generate)
    monkeypatch.setattr(ImageInputs, "batch", recording_batch)
    gaps = recorded_sampling_gaps(monkeypatch)
    trainer = count_squares_trainer(tmp_path, family, max_steps=2, vllm_shared_weights=True, vllm_merge_adapter=merge)
    plan = trainer.rollout_plan
    transport = "merged" if merge else "lora-request"
    assert (plan.shared_weights, plan.kv_standby, plan.adapter_transport) == (True, "trainer", transport)
    llm = trainer.vllm_generation.llm
    vllm_model = llm.collective_rpc(_worker.model_of)[0]
    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert storage_ptrs(base) <= storage_ptrs(vllm_model.parameters())
    assert kv_cache_nbytes(llm) == 0  # released until the first rollout
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(".visual." in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}

    trainer.train()
    assert storage_ptrs(p for n, p in trainer.model.named_parameters() if "lora_" not in n) <= storage_ptrs(
        vllm_model.parameters()
    )
    # vLLM got every prompt's image, and the fused log-prob pass ran on the images.
    assert requests and all("image" in r.get("multi_modal_data", {}) for r in requests)
    assert passes
    if merge:
        # vLLM decoded the adapter merged into the shared weights, the tower's included, restored bit for bit after.
        assert llm.adapter is None and trainer._adapter_merger.host_bytes > 0
        after = dict(trainer.model.named_parameters())
        assert all(torch.equal(after[n], w) for n, w in base_before.items())
    else:
        # vLLM sampled from the adapter of the last update, vision tower included, handed over in memory.
        assert llm.adapter is not None and llm.adapter.lora_int_id >= 2
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2
    # Every completion token's log-prob as vLLM sampled it equals the trainer's: the same prompt (the image's run of
    # tokens as the trainer has it, `image_prompts`), the same weights and adapter, the tower's included.
    assert len(gaps) == 2 and max(gaps) < TOLERANCES["sampled_gap"], gaps
    params = dict(trainer.model.named_parameters())
    # The tiny Qwen3-VL (2 decoder layers, 2 tower blocks) adds its last deepstack feature after the last decoder layer,
    # where it reaches only the image positions' own logits, never scored: that merger's adapter gets no gradient.
    unreached = "deepstack_merger_list.1." if family == "qwen3_vl" else None
    unchanged = [n for n in trainable if torch.equal(params[n], trainable[n])]
    assert unchanged == [n for n in trainable if unreached and unreached in n], "adapters not updated"
    assert kv_cache_nbytes(llm) == 0  # released after the last rollout


def test_trls_own_engine_gets_one_token_per_image(tmp_path, in_process_engine, monkeypatch):
    """With TRL's own engine (vllm_shared_weights=False) the trainer wraps that engine's generate too: its rollout
    samples from the prompt the trainer scores. One step: the random model's second rollout samples an image token in
    a completion, which transformers then counts as an image placeholder (an image-token mismatch error)."""
    gaps = recorded_sampling_gaps(monkeypatch)
    trainer = count_squares_trainer(tmp_path, max_steps=1, vllm_shared_weights=False)
    assert (trainer.rollout_plan.shared_weights, trainer.rollout_plan.adapter_transport) == (False, "weight-sync")
    assert getattr(trainer.vllm_generation.llm.generate, "__one_token_per_image__", False)
    trainer.train()
    assert len(gaps) == 1 and gaps[0] < TOLERANCES["trl_engine_sampled_gap"], gaps


def test_recipe_run_prepares_and_runs_the_vision_recipe(tmp_path, repo_root):
    """`tools/bench/recipe_run.py` on the vision recipe, as the GPU run will use it, with a tiny Qwen3-VL on the CPU:
    the checkpoint folder (processor and video processor configuration included), one step through `longctx-grpo
    train` with vLLM colocated on shared weights, and the report."""
    import json
    import subprocess
    import sys

    script, work = str(repo_root / "tools" / "bench" / "recipe_run.py"), str(tmp_path / "work")
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    cpu = ["use_cpu=true", "bf16=false", "dtype=float32", "prompt_words=10", "max_completion_length=4",
           "vllm_max_model_length=256", "num_prompts=4"]  # fmt: skip
    recipe = str(repo_root / "configs" / "grpo" / "qwen3_vl_8b_lora_h200.yaml")
    steps = [
        ["prepare", recipe, "--work", work, "--tiny", "--steps", "1", *(a for s in cpu for a in ("--set", s))],
        ["launch", "--work", work],
        ["poll", "--work", work, "--wait", "300"],
        ["report", "--work", work, "--out", str(tmp_path / "report.json")],
    ]
    for step in steps:
        done = subprocess.run([sys.executable, script, *step], env=env, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "work" / "model" / "video_preprocessor_config.json").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit"]["rc"] == 0 and len(report["rollouts"]) == 1  # one KV restore-release around the rollout
    assert any("weights shared with the trainer" in line for line in report["plan_lines"]), report["plan_lines"]
