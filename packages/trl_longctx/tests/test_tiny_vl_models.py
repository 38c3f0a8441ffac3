"""Tiny vision-language models and processors built locally: the vision tokens are single tokens, the processor
expands each image to one token per merged patch, bad family names are refused."""

import re

import pytest

pytest.importorskip("PIL", reason="vision-language tests need the `vision` extra (Pillow)")

from trl_longctx.tiny_vl_models import (
    FAMILIES,
    VISION_TOKENS,
    build_tiny_vl_model,
    build_tiny_vl_processor,
    build_vl_tokenizer,
)


def test_vl_tokenizer_has_the_vision_tokens_as_single_tokens():
    tok = build_vl_tokenizer()
    assert tok.image_token == "<|image_pad|>" and tok.padding_side == "left"
    for token in [*VISION_TOKENS.values(), "<|im_start|>", "<|im_end|>"]:
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id
        assert len(tok(token)["input_ids"]) == 1
    assert tok.decode(tok("how many?")["input_ids"]) == "how many?"


@pytest.mark.parametrize("family, tokens", [("qwen2_5_vl", 4), ("qwen3_vl", 4)])
def test_processor_expands_an_image_to_its_merged_patches(family, tokens):
    from PIL import Image

    processor = build_tiny_vl_processor(family)
    assert not hasattr(processor, "video_processor")  # images only: transformers' video processors need torchvision
    image = Image.new("RGB", (56, 56))
    prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "n?"}]}]
    inputs = processor.apply_chat_template(
        [prompt], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(VISION_TOKENS["image_token"])
    assert (inputs["input_ids"] == image_id).sum() == tokens == inputs["mm_token_type_ids"].sum()
    assert inputs["image_grid_thw"].prod() == 4 * tokens  # 2 x 2 patches merge into one token
    model = build_tiny_vl_model(family, processor.tokenizer)
    assert model(**inputs).logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))


def test_bad_family_is_refused():
    for build in (build_tiny_vl_processor, lambda f: build_tiny_vl_model(f, build_vl_tokenizer())):
        with pytest.raises(ValueError, match=re.escape(f"family must be one of {list(FAMILIES)}, got 'llava'.")):
            build("llava")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_saved_checkpoint_names_the_familys_full_processor(family, tmp_path):
    """`save_tiny_vl_checkpoint` writes what vLLM loads: the family's processor class (not the images-only subclass)
    and a video processor configuration with the image processor's sizes (loading it needs torchvision, writing it
    does not)."""
    import json

    from trl_longctx.tiny_vl_models import PROCESSOR_CLASS, VIDEO_PROCESSOR_CLASS, save_tiny_vl_checkpoint

    folder = save_tiny_vl_checkpoint(tmp_path / "model", family)
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == PROCESSOR_CLASS[family]
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    image = build_tiny_vl_processor(family).image_processor
    assert video["video_processor_type"] == VIDEO_PROCESSOR_CLASS[family]
    assert (video["patch_size"], video["merge_size"], video["size"]) == (
        image.patch_size,
        image.merge_size,
        dict(image.size),
    )
