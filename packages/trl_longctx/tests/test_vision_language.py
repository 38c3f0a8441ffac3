"""Vision-language models on our fused log-prob path: tiny random Qwen2.5-VL and Qwen3-VL (fp32, CPU, LoRA on every
linear layer of the vision tower and the language decoder) give TRL's path's log-probs, entropies and LoRA gradients
on batches of several images of different sizes, left padded, in mini batches of 1 and 2; the image inputs of each
mini batch are TRL's slices; offloaded checkpoints and tiled MLPs attach to the language decoder only; what we cannot
serve goes to TRL's path, logged; a short GRPO run of the `count_squares` task trains every adapter."""

import logging

import pytest
import torch
import transformers
from peft import LoraConfig
from test_longctx_grpo_trainer import varied_reward
from testing_utils import assert_close, cpu_trainer_settings, recording
from trl import GRPOTrainer

pytest.importorskip("PIL", reason="vision-language tests need the `vision` extra (Pillow)")

from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer, logprob_pass, vision_language
from trl_longctx.memory import planner
from trl_longctx.memory.shapes import ModelShape
from trl_longctx.tasks import count_squares_reward, draw_squares, make_count_squares_dataset
from trl_longctx.tiny_vl_models import build_tiny_vl_model, build_tiny_vl_processor
from trl_longctx.vision_language import ImageInputs

# fp32 end to end: our chunked log-softmax over the backbone's hidden states against TRL's fused lm_head forward of
# the same backbone, so only the order of the float32 sums differs (as in the dense trainer test).
TOLERANCES = {"logps": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-5, "rtol": 1e-3}}
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
# Nonzero B so that every adapter changes the outputs and gets a gradient; "all-linear" adapts the vision tower too,
# so the vision tower's gradients are compared as well.
LORA = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
# Image sizes (width, height) of each sequence of `image_batch`: 1, 2 and 1 images of different sizes.
IMAGE_SIZES = [[(56, 56)], [(84, 56), (28, 28)], [(112, 56)]]


def varied_chat_reward(completions, **kwargs):
    """`varied_reward` of conversational completions (`[{"role": "assistant", "content": ...}]`)."""
    return varied_reward([c[-1]["content"] for c in completions])


def make_trainer(
    family, tmp_path, peft_config=LORA, reward_funcs=varied_chat_reward, model=None, **overrides
) -> LongContextGRPOTrainer:
    """Our trainer on a tiny vision-language model of `family`, on CPU in fp32; `model`: one to train instead of a
    fresh one (built for `build_tiny_vl_processor(family)`'s tokenizer)."""
    processor = build_tiny_vl_processor(family)
    small = {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 4}
    settings = cpu_trainer_settings(tmp_path, **{**small, **overrides})
    trainer = LongContextGRPOTrainer(
        model=model if model is not None else build_tiny_vl_model(family, processor.tokenizer),
        reward_funcs=reward_funcs,
        args=LongContextGRPOConfig(**settings),
        train_dataset=make_count_squares_dataset(8),
        processing_class=processor,
        peft_config=peft_config,
    )
    # What `Trainer.train` does first (the comparisons call the log-prob hooks directly): checkpoint every layer, the
    # vision tower's blocks included.
    trainer.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs
    )
    return trainer


def image_batch(processor, completion: int = 5, sizes=IMAGE_SIZES):
    """Prompts with images of `sizes` through the processor (left padded), random completion tokens appended, and
    the multimodal keywords TRL passes (`mm_token_type_ids` extended with zeros over the completion, as TRL does)."""
    generator = torch.Generator().manual_seed(0)
    images = [[_noise_image(width, height, generator) for width, height in sequence_sizes] for sequence_sizes in sizes]
    prompts = [
        [{"role": "user", "content": [*({"type": "image", "image": i} for i in imgs), {"type": "text", "text": "n?"}]}]
        for imgs in images
    ]
    inputs = processor.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    tokenizer = processor.tokenizer
    characters = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789abc")))
    completion_ids = characters[torch.randint(0, len(characters), (len(sizes), completion), generator=generator)]
    input_ids = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(completion_ids)], dim=1)
    assert (attention_mask[:, 0] == 0).any(), "the batch must have left padding"
    multimodal = {
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
        "num_images": [len(s) for s in sizes],
        "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1),
    }
    return input_ids, attention_mask, completion, multimodal


def _noise_image(width, height, generator):
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def run(implementation, trainer, batch, batch_size=None):
    """Log-probs, entropies and the LoRA gradients of their sum."""
    model = trainer.model
    input_ids, attention_mask, keep, multimodal = batch
    model.zero_grad()
    logps, entropies, _ = implementation(
        trainer, model, input_ids, attention_mask, keep, batch_size, compute_entropy=True, **multimodal
    )
    (logps.sum() + entropies.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), entropies.detach(), grads


def assert_same(ours, trl):
    assert_close(ours[0], trl[0], "logps", **TOLERANCES["logps"])
    assert_close(ours[1], trl[1], "entropies", **TOLERANCES["logps"])
    assert ours[2].keys() == trl[2].keys()
    assert any(".visual." in n for n in ours[2]) and any(".language_model." in n for n in ours[2])
    for name in ours[2]:
        assert_close(ours[2][name], trl[2][name], f"grad of {name}", **TOLERANCES["grads"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "overrides",
    [{"grpo_mini_batch": 1, "offload_checkpoints": True, "tiled_mlp_chunks": 2}, {"grpo_mini_batch": 2}],
    ids=["mini-batch-1-offloaded-tiled", "mini-batch-2"],
)
def test_logps_entropies_and_lora_grads_match_trl_path(family, overrides, tmp_path, monkeypatch):
    trainer = make_trainer(family, tmp_path, **overrides)
    passes, slices = [], []
    monkeypatch.setattr(trainer.logprob_pass, "sizes", recording(trainer.logprob_pass.sizes, passes))
    monkeypatch.setattr(ImageInputs, "batch", recording(ImageInputs.batch, slices))
    tiled = []
    tile = logprob_pass.tile_mlps
    monkeypatch.setattr(logprob_pass, "tile_mlps", lambda module, chunks: tiled.append(module) or tile(module, chunks))
    batch = image_batch(trainer.processing_class)
    offloaded_before = trainer.logprob_pass.offloader.offloaded_count
    ours = run(LongContextGRPOTrainer._get_per_token_logps_and_entropies, trainer, batch)
    trl = run(GRPOTrainer._get_per_token_logps_and_entropies, trainer, batch)
    mini_batch = overrides["grpo_mini_batch"]
    assert passes and passes[0].grpo_mini_batch == mini_batch  # our path ran, in mini batches of this size
    assert len(slices) == -(-3 // mini_batch)
    assert ours[0].shape == (3, batch[2]) and ours[0].dtype == torch.float32
    assert_same(ours, trl)
    # MLP tiles go to the language decoder's MLPs only (Qwen2.5-VL's vision blocks have gate/up/down MLPs too).
    language_model = trainer.model.get_base_model().model.language_model
    assert tiled and all(module is language_model for module in tiled)
    if overrides.get("offload_checkpoints"):
        # One offloaded input per mini batch and language layer but the last (kept on the device); none of the
        # vision tower's blocks, which are checkpointed too.
        layers = trainer.model.config.text_config.num_hidden_layers
        assert trainer.logprob_pass.offloader.offloaded_count - offloaded_before == len(slices) * (layers - 1)


@pytest.mark.parametrize("mini_batch", [1, 2])
def test_trl_batch_size_does_not_change_our_pass(mini_batch, tmp_path):
    # TRL's `batch_size` (its mini batch) of 2 over 3 sequences, ours of 1 or 2: the same log-probs as TRL's.
    trainer = make_trainer("qwen2_5_vl", tmp_path, grpo_mini_batch=mini_batch)
    batch = image_batch(trainer.processing_class)
    ours = run(LongContextGRPOTrainer._get_per_token_logps_and_entropies, trainer, batch, batch_size=2)
    trl = run(GRPOTrainer._get_per_token_logps_and_entropies, trainer, batch, batch_size=2)
    assert_same(ours, trl)


@pytest.mark.parametrize("targets, trained", [("all-linear", True), (["q_proj", "v_proj"], False)])
def test_the_planner_counts_image_tokens_and_the_vision_tower(targets, trained, tmp_path, monkeypatch):
    trainer = make_trainer("qwen2_5_vl", tmp_path, peft_config=LoraConfig(r=4, target_modules=targets))
    planned = []
    plan = planner.auto_chunk_sizes
    monkeypatch.setattr(planner, "auto_chunk_sizes", lambda *a, **k: planned.append((a, k)) or plan(*a, **k))
    trainer.logprob_pass.free_bytes = lambda: 64 * 2**30  # plan on CPU, as on CUDA
    input_ids, attention_mask, keep, multimodal = image_batch(trainer.processing_class)
    LongContextGRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, input_ids, attention_mask, keep, **multimodal
    )
    ((config, _, sequences, prompt, completion), options), *_ = planned
    assert ModelShape.from_config(config).vision is not None
    # The image tokens are part of the prompt; the most patches of one sequence: its 112 x 56 image, 8 x 4 patches.
    assert (sequences, prompt, completion) == (3, input_ids.size(1) - keep, keep)
    assert (options["vision_patches"], options["vision_trained"]) == (32, trained)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_patches_counts_the_rows_the_processor_writes(family):
    """The patches a sequence's images feed the tower, from its token ids alone: the rows of its `pixel_values`."""
    processor = build_tiny_vl_processor(family)
    input_ids, _, _, multimodal = image_batch(processor)
    config = build_tiny_vl_model(family, processor.tokenizer).config
    rows = ImageInputs(multimodal, input_ids.size(0)).patches_per_sequence()
    assert [vision_language.image_patches(config, ids.tolist()) for ids in input_ids] == rows == [16, 28, 32]
    assert vision_language.most_image_patches(config, input_ids.tolist()) == 32
    text_config = config.get_text_config()
    assert vision_language.most_image_patches(text_config, input_ids.tolist()) == 0  # no vision_config: a text model


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_host_buffers_are_reserved_for_images(family, tmp_path, monkeypatch, caplog):
    """After the rollout the trainer pins the host buffers of the step's offloaded checkpoints in the background,
    planned with the images' patches as the step plans them: the step allocates none itself. Buffers at their exact
    sizes (no 2 MiB rounding), so the reserved ones serve the step only if they were sized right."""
    from trl_longctx.memory import offload_checkpoints

    trainer = make_trainer(
        family, tmp_path, peft_config=LoraConfig(r=4, target_modules="all-linear"), max_steps=1, use_vllm=False,
        offload_checkpoints=True, reward_funcs=[count_squares_reward, varied_chat_reward],
    )  # fmt: skip
    trainer.logprob_pass.free_bytes = lambda: 64 * 2**30  # plan on CPU, as on CUDA
    reserved_with = []
    sizes = logprob_pass.LogProbPass.host_buffer_sizes
    monkeypatch.setattr(logprob_pass.LogProbPass, "host_buffer_sizes",
                        lambda *a, **k: reserved_with.append(k["vision"]) or sizes(*a, **k))  # fmt: skip
    monkeypatch.setattr(offload_checkpoints, "_BUFFER_GRANULARITY", 1)
    with caplog.at_level("INFO", logger="trl_longctx.longctx_grpo_trainer"):
        trainer.train()
    offloader = trainer.logprob_pass.offloader
    layers = trainer.model.get_base_model().config.get_text_config().num_hidden_layers
    # count_squares draws 56 x 56 images: 4 x 4 patches of 14 pixels; the tower is adapted ("all-linear").
    assert reserved_with == [logprob_pass.VisionLoad(16, True)]
    assert offloader.offloaded_count > 0 and offloader.pool_allocations == 0
    reserved = f"step 1: host buffers of offloaded checkpoints: {layers - 1} reserved in the background"
    assert any(m.startswith(reserved) for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sampled_image_token_is_refused_naming_the_setting(family, tmp_path):
    """A completion holding the image token (the policy sampled it; vLLM does not suppress it) is refused before
    either log-prob path runs, naming the sequence, its counts and vLLM's `logit_bias` setting, instead of the model's
    bare "Image features and image tokens do not match"."""
    trainer = make_trainer(family, tmp_path)
    input_ids, attention_mask, keep, multimodal = image_batch(trainer.processing_class)
    token = trainer.model.get_base_model().config.image_token_id
    sampled = input_ids.clone()
    sampled[1, -2] = token  # sequence 1's images: 24 + 4 patches, 7 image tokens after the 2 x 2 merge
    expected = (
        rf"Step 1: 1 of 3 sequences have another number of image tokens \(id {token}\) than their images give "
        rf"features \(sequence 1: 8 image tokens, 7 features\).*generation_kwargs=\{{'logit_bias': \{{{token}: -100\}}\}}"
    )
    with pytest.raises(ValueError, match=expected):
        LongContextGRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, sampled, attention_mask, keep, **multimodal
        )
    logps, _, _ = LongContextGRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, input_ids, attention_mask, keep, **multimodal
    )
    assert torch.isfinite(logps).all()


def test_image_inputs_are_trls_slices():
    # The rows TRL 1.16's loop gives sequences start:end (its own arithmetic, restated), including a sequence
    # without an image.
    grid = torch.tensor([[1, 2, 2], [1, 4, 2], [1, 2, 4], [1, 2, 2]])
    rows = grid.prod(-1)
    pixel_values = torch.arange(int(rows.sum()) * 3, dtype=torch.float32).view(-1, 3)
    num_images = [1, 0, 2, 1]
    tokens = torch.arange(4 * 5).view(4, 5)
    images = ImageInputs(
        {"pixel_values": pixel_values, "image_grid_thw": grid, "num_images": num_images, "mm_token_type_ids": tokens},
        4,
    )
    assert images.patches_per_sequence() == [4, 0, 16, 4]
    image_starts = [0, *torch.tensor(num_images).cumsum(0).tolist()]
    row_starts = [0, *torch.stack([s.sum() for s in torch.split(rows, num_images)]).cumsum(0).tolist()]
    for start, end in [(0, 1), (1, 2), (0, 2), (1, 3), (2, 4), (0, 4), (3, 4)]:
        got = images.batch(start, end)
        assert torch.equal(got["pixel_values"], pixel_values[row_starts[start] : row_starts[end]])
        assert torch.equal(got["image_grid_thw"], grid[image_starts[start] : image_starts[end]])
        assert torch.equal(got["mm_token_type_ids"], tokens[start:end])


def test_image_inputs_refuse_counts_that_do_not_add_up():
    grid = torch.tensor([[1, 2, 2]])
    with pytest.raises(ValueError, match=r"num_images must give one image count per sequence \(2\).*got \[1\]"):
        ImageInputs({"pixel_values": torch.zeros(4, 3), "image_grid_thw": grid, "num_images": [1]}, 2)
    with pytest.raises(ValueError, match="Mismatch"):  # TRL's own check of the rows
        ImageInputs({"pixel_values": torch.zeros(5, 3), "image_grid_thw": grid, "num_images": [1]}, 1)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("architecture", "Qwen2_5_VLForConditionalGeneration: the fused log-prob pass serves images of"),
        ("inputs", "Qwen2_5_VLForConditionalGeneration: the inputs ['image_sizes'] are not sliced per sequence"),
    ],
)
def test_what_we_cannot_serve_goes_to_trl_path_logged(case, expected, tmp_path, monkeypatch, caplog):
    trainer = make_trainer("qwen2_5_vl", tmp_path)
    input_ids, attention_mask, keep, multimodal = image_batch(trainer.processing_class)
    if case == "architecture":
        monkeypatch.setattr(vision_language, "SERVED_ARCHITECTURES", ("Qwen3VLForConditionalGeneration",))
    else:
        multimodal["image_sizes"] = torch.tensor([[56, 56]] * 4)
    monkeypatch.setattr(trainer.logprob_pass, "sizes", _refuse)
    handed_back = []
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", lambda *a, **k: handed_back.append(k))
    with caplog.at_level(logging.WARNING, logger="trl_longctx.longctx_grpo_trainer"):
        LongContextGRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, keep, **multimodal
        )
    assert len(handed_back) == 1 and handed_back[0]["pixel_values"] is multimodal["pixel_values"]
    assert "Image inputs go to TRL's log-prob path" in caplog.text and expected in caplog.text


def test_count_squares_dataset_and_reward():
    dataset = make_count_squares_dataset(6, seed=1)
    assert dataset.column_names == ["prompt", "image", "target"]
    row = dataset[0]
    assert [part["type"] for part in row["prompt"][0]["content"]] == ["image", "text"]
    assert row["image"].size == (56, 56) and row["target"] in {"1", "2", "3", "4"}
    completions = [[{"role": "assistant", "content": c}] for c in (" 3 ", "3 squares", "4")]
    assert count_squares_reward(completions, target=["3", "3", "3"]) == [1.0, 0.0, 0.0]


def test_count_squares_prompt_words_open_the_text_and_leave_the_images():
    from trl_longctx.tasks import COUNT_SQUARES_QUESTION, FILLER_WORDS, get_task

    plain, long = make_count_squares_dataset(4, seed=2), make_count_squares_dataset(4, seed=2, prompt_words=300)
    assert plain["target"] == long["target"]
    assert [i.tobytes() for i in plain["image"]] == [i.tobytes() for i in long["image"]]
    for prompt in long["prompt"]:
        image, text = prompt[0]["content"]
        document, question = text["text"].split("\n")
        assert image["type"] == "image" and question == COUNT_SQUARES_QUESTION
        assert len(document.split(" ")) == 300 and set(document.split(" ")) <= set(FILLER_WORDS)
    assert get_task("count_squares").vision and not get_task("copy_letter").vision
    with pytest.raises(ValueError, match="prompt_words must be >= 0, got -1"):
        make_count_squares_dataset(4, prompt_words=-1)


@pytest.mark.parametrize("count", [0, 1, 4, 16])
def test_draw_squares_draws_that_many_squares(count):
    import random

    import numpy as np

    pixels = np.asarray(draw_squares(count, random.Random(count))).any(-1)
    cells = pixels.reshape(4, 14, 4, 14).any(axis=(1, 3))
    assert cells.sum() == count and pixels.sum() == count * 9 * 9


def test_count_squares_grpo_run_trains_every_adapter(tmp_path, monkeypatch, caplog):
    # Two steps: our trainer's rollouts with transformers' generate, rewards, the loss from our fused pass on the
    # images. The exact-count reward of a random model is almost always 0 (no advantage, no update), so a varied
    # reward is added as TRL's own tests do with their dummy reward functions.
    trainer = make_trainer(
        "qwen2_5_vl", tmp_path, peft_config=LoraConfig(r=4, target_modules="all-linear"),
        reward_funcs=[count_squares_reward, varied_chat_reward], max_steps=2, use_vllm=False,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_longctx.longctx_grpo_trainer"):
        train_on_images_and_check_every_adapter(trainer, monkeypatch)
    assert "Image inputs go to TRL's log-prob path" not in caplog.text
    assert "rewards/count_squares_reward/mean" in trainer.state.log_history[0]


def train_on_images_and_check_every_adapter(trainer, monkeypatch) -> None:
    """Train; the fused pass must have run on the images and every trainable parameter moved."""
    passes = []
    monkeypatch.setattr(ImageInputs, "batch", recording(ImageInputs.batch, passes))
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert passes, "the fused pass never ran on images"
    params = dict(trainer.model.named_parameters())
    unchanged = [n for n in trainable if torch.equal(params[n], trainable[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"


def _refuse(*args, **kwargs):
    raise AssertionError("the fused log-prob pass ran for images it cannot serve")


def test_count_squares_grpo_run_on_4bit_weights_trains_every_adapter(tmp_path, monkeypatch):
    # QLoRA on a vision-language model (the 24 GB recipe's setup): the decoder's and the tower's linear layers in NF4
    # (bitsandbytes on CPU), LoRA on all of them, our fused pass on the images.
    bnb = pytest.importorskip("bitsandbytes")
    processor = build_tiny_vl_processor("qwen2_5_vl")
    build_tiny_vl_model("qwen2_5_vl", processor.tokenizer).save_pretrained(tmp_path / "model")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "model", quantization_config=quantization, device_map="cpu"
    )
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.visual.modules())
    trainer = make_trainer(
        "qwen2_5_vl", tmp_path / "run", peft_config=LoraConfig(r=4, target_modules="all-linear"),
        reward_funcs=[count_squares_reward, varied_chat_reward], model=model, max_steps=2, use_vllm=False,
    )  # fmt: skip
    train_on_images_and_check_every_adapter(trainer, monkeypatch)
