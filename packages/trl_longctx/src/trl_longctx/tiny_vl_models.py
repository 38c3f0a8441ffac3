"""Tiny vision-language models and processors built locally (Qwen2.5-VL, Qwen3-VL), for tests and offline demos.

Nothing here downloads anything. The tokenizer is `tiny_models`' character tokenizer with the chat and vision special
tokens the Qwen-VL processors and models look up (`<|image_pad|>`, `<|vision_start|>`, ...); the image processor is
transformers' PIL/numpy one of the family (`Qwen2VLImageProcessorPil`, which both families use), so no torchvision is
needed; the model is a transformers architecture instantiated from a config with random weights.

The Qwen-VL processors also require a video processor, and every transformers video processor requires torchvision.
`build_tiny_vl_processor` therefore builds an images-only subclass of the family's processor (`image_processor` and
`tokenizer` only): text and images are processed exactly as the family's processor does, videos are refused by
transformers (the processor has no `video_processor`). `save_tiny_vl_checkpoint` saves a model with the family's full
processor configuration (a video processor's included), as a checkpoint of the hub has it: what vLLM loads, and
what `AutoProcessor` loads where torchvision is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
# The special tokens of the Qwen-VL chat format that the processors and models use.
VISION_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# Qwen's chat format without newlines (the character vocabulary has none): `<|im_start|>user:...<|im_end|>`, each
# image as `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands `<|image_pad|>` to one token per
# merged patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}"
)
# Patch sizes of the real checkpoints (Qwen2.5-VL 14, Qwen3-VL 16); 2x2 patches merge into one token. Images are
# resized to between 1 and 16 merged tokens (multiples of `patch * merge` pixels a side).
PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16}
MERGE_SIZE, TEMPORAL_PATCH_SIZE, MAX_TOKENS_PER_IMAGE = 2, 2, 16
# The family's processor and video processor classes, as a hub checkpoint's configuration names them.
PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
VIDEO_PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2VLVideoProcessor", "qwen3_vl": "Qwen3VLVideoProcessor"}


def build_vl_tokenizer():
    """The character tokenizer (`tiny_models.build_char_tokenizer`'s vocabulary) plus the Qwen-VL chat and vision
    special tokens, exposed as `tokenizer.image_token` etc. as the Qwen-VL processors read them.

    Returns:
        A `transformers.PreTrainedTokenizerFast` with left padding.
    """
    from .tiny_models import build_char_tokenizer

    return build_char_tokenizer(CHAT_TOKENS + list(VISION_TOKENS.values()), VISION_TOKENS)


def build_tiny_vl_processor(family: str = "qwen2_5_vl", tokenizer=None, pixels: tuple[int, int] | None = None):
    """The family's processor (images only) over `build_vl_tokenizer()` and its PIL image processor.

    Args:
        family: `"qwen2_5_vl"` or `"qwen3_vl"`.
        tokenizer: Another tokenizer with the Qwen-VL chat and vision special tokens (`tokenizer.image_token` etc.);
            default `build_vl_tokenizer()`.
        pixels: `(min_pixels, max_pixels)` an image is resized to lie between; default 1 to `MAX_TOKENS_PER_IMAGE`
            merged tokens.

    Returns:
        A `ProcessorMixin` (a subclass of `Qwen2_5_VLProcessor` / `Qwen3VLProcessor` without a video processor)
        with `CHAT_TEMPLATE`, as TRL's `GRPOTrainer` takes it for `processing_class`.

    Raises:
        ValueError: If `family` is not one of `FAMILIES`.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor_class = _images_only(_processor_class(family))
    factor = PATCH_SIZE[family] * MERGE_SIZE
    min_pixels, max_pixels = pixels or (factor * factor, factor * factor * MAX_TOKENS_PER_IMAGE)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE[family],
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer or build_vl_tokenizer(), chat_template=CHAT_TEMPLATE
    )


def build_tiny_vl_model(
    family: str,
    tokenizer,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    seed: int = 0,
):
    """A Qwen2.5-VL or Qwen3-VL with random weights, in float32 on CPU.

    Text decoder: `hidden_size`, `num_hidden_layers`, 2 attention heads of 32 (one KV head), MLP 96 wide; multimodal
    RoPE sections sized for the head (`[4, 6, 6]`, Qwen3-VL interleaved `[6, 5, 5]`). Vision tower: `vision_depth`
    blocks of `vision_hidden_size`, the family's patch size, 2x2 merge (Qwen2.5-VL: window attention in block 0, full
    attention in the last; Qwen3-VL: every block feeds a deepstack feature to the text decoder).

    Args:
        family: `"qwen2_5_vl"` or `"qwen3_vl"`.
        tokenizer: `build_vl_tokenizer()` (or the processor's tokenizer): its vocabulary size and special token ids
            are written into the config.
        seed: Seed of the random initialization.

    Returns:
        A `Qwen2_5_VLForConditionalGeneration` or `Qwen3VLForConditionalGeneration`.

    Raises:
        ValueError: If `family` is not one of `FAMILIES`.
    """
    import torch
    import transformers

    heads, head_dim = 2, 32
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 96,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 48,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "patch_size": PATCH_SIZE[_checked(family)],
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in VISION_TOKENS.items()}
    if family == "qwen2_5_vl":
        # Window attention over 2x2 merged tokens (56 pixels) in block 0, full attention in the last block.
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
        vision.update(window_size=2 * PATCH_SIZE[family] * MERGE_SIZE, fullatt_block_indexes=[vision_depth - 1])
        config = transformers.Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": rope}, vision_config=vision, **ids
        )
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=list(range(vision_depth)))
        config = transformers.Qwen3VLConfig(
            text_config={**text, "head_dim": head_dim, "rope_parameters": rope}, vision_config=vision, **ids
        )
        model_class = transformers.Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_vl_checkpoint(folder, family: str = "qwen2_5_vl", **model_kwargs) -> Path:
    """Save `build_tiny_vl_model(family, ...)` with its processor as a checkpoint folder that vLLM serves.

    The processor is `build_tiny_vl_processor(family)`'s, saved by `save_vl_processor` (the family's full processor
    configuration: what vLLM and `AutoProcessor` load; both need torchvision for it, writing it does not).

    Args:
        folder: Where to save (created if missing).
        family: `"qwen2_5_vl"` or `"qwen3_vl"`.
        **model_kwargs: Passed to `build_tiny_vl_model` (sizes, `seed`).

    Returns:
        The folder, as a `Path`.
    """
    folder = Path(folder)
    processor = build_tiny_vl_processor(family)
    build_tiny_vl_model(family, processor.tokenizer, **model_kwargs).save_pretrained(folder)
    save_vl_processor(folder, family, processor)
    return folder


def save_vl_processor(folder, family: str, processor) -> None:
    """Save `processor` (images only, as `build_tiny_vl_processor` builds it, with any tokenizer and image sizes) as a
    hub checkpoint has its processor: the configuration names the family's processor class (not the images-only
    subclass) and a video processor configuration with the image processor's sizes lies beside it
    (`video_preprocessor_config.json`), so that vLLM and `AutoProcessor` load the family's full processor."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (path := folder / name).exists() and "processor_class" in (config := json.loads(path.read_text())):
            path.write_text(json.dumps({**config, "processor_class": PROCESSOR_CLASS[_checked(family)]}, indent=2))
    image = processor.image_processor
    video = {
        "video_processor_type": VIDEO_PROCESSOR_CLASS[family],
        **{key: getattr(image, key) for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean",
                                                "image_std")},
        "size": dict(image.size),
    }  # fmt: skip
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def _checked(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}.")
    return family


def _processor_class(family: str):
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor

    return {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}[_checked(family)]


def _images_only(processor_class):
    """A subclass of `processor_class` whose sub-processors are `image_processor` and `tokenizer` only.

    transformers reads a processor's sub-processors from its `__init__` parameters (`ProcessorMixin.get_attributes`);
    the family's `__init__` runs with `video_processor=None`, which `ProcessorMixin` then never sees.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"ImagesOnly{processor_class.__name__}", (processor_class,), {"__init__": __init__})
