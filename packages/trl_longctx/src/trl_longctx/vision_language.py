"""Vision-language models on the fused log-prob pass: which it serves, their parts, their image inputs per sequence.

TRL's `_get_per_token_logps_and_entropies` runs the causal LM on each mini batch of sequences with that mini batch's
share of the image inputs. For Qwen2.5-VL and Qwen3-VL these are (from the processor, as TRL's batch holds them):

- `pixel_values` `[patches, channels * temporal_patch * patch * patch]`: the patches of every image of the batch,
  image after image, sequence after sequence;
- `image_grid_thw` `[images, 3]`: each image's patch grid (its patches: the product);
- `num_images`: a list, images per sequence;
- `mm_token_type_ids` `[B, T]`: 1 on image tokens, from which the model builds its 3-D rotary positions.

The fused pass runs the multimodal backbone (the model's `base_model`: the vision tower, its features written into the
token embeddings at the image tokens, then the language decoder) to `last_hidden_state`, the call TRL's fused lm_head
forward (`trl.trainer.utils.add_fused_lm_head`) makes, and the lm_head in `longctx_kernels.selective_logprobs`.
`ImageInputs` gives each mini batch of the pass the rows TRL's loop gives it, by TRL's own split of the batch per
sequence (`trl.trainer.utils.split_pixel_values_by_grid`, declared in `trl_contract`). Offloaded checkpoints and tiled
MLPs attach to the language decoder's layers only (`VisionLanguageParts.language_model`): the vision tower's blocks
are checkpointing layers too, but they run over patches, not over the decoder's tokens.

Architectures and inputs the pass does not serve are refused with `VisionLanguageUnsupported`, naming them; the trainer
then runs TRL's path for that pass and logs why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "SERVED_ARCHITECTURES",
    "ImageInputs",
    "VisionLanguageParts",
    "VisionLanguageUnsupported",
    "image_patches",
    "most_image_patches",
    "refuse_image_token_mismatch",
    "vision_parts",
]

# Verified against TRL's path (tests/test_vision_language.py): logps, entropies and LoRA gradients.
SERVED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")
# The multimodal keywords of these models in TRL's batch: sliced per image (`pixel_values`, `image_grid_thw`, by
# `num_images`) or per sequence (`mm_token_type_ids`).
SERVED_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")


class VisionLanguageUnsupported(TypeError):
    """The model or its image inputs are not served by the fused log-prob pass (TRL's path serves them)."""


@dataclass(frozen=True)
class VisionLanguageParts:
    """The modules of a vision-language model the fused pass runs.

    Attributes:
        architecture: The model's class name (for messages).
        backbone: Maps `input_ids`, `attention_mask` and the image inputs to `last_hidden_state` `[B, T, H]`, image
            features merged (the model's `base_model`).
        language_model: The language decoder, whose layers offloaded checkpoints and tiled MLPs attach to.
        vision_tower: The vision encoder (`visual`).
    """

    architecture: str
    backbone: nn.Module
    language_model: nn.Module
    vision_tower: nn.Module

    @property
    def vision_trained(self) -> bool:
        """Whether any vision tower parameter takes gradients (then its activations are kept for the backward)."""
        return any(p.requires_grad for p in self.vision_tower.parameters())


def vision_parts(model: nn.Module, multimodal: Mapping[str, Any]) -> VisionLanguageParts:
    """The parts of `model` the fused pass runs for a batch with the image inputs `multimodal`.

    Args:
        model: A transformers vision-language model, or a PEFT model wrapping one.
        multimodal: The multimodal keywords TRL passed (`None` values dropped).

    Raises:
        VisionLanguageUnsupported: The architecture is not one of `SERVED_ARCHITECTURES`, or `multimodal` holds a
            keyword other than `SERVED_INPUTS` or lacks `image_grid_thw` / `num_images` beside `pixel_values`; the
            message names the architecture and what is not served.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name not in SERVED_ARCHITECTURES:
        raise VisionLanguageUnsupported(
            f"{name}: the fused log-prob pass serves images of {', '.join(SERVED_ARCHITECTURES)} only."
        )
    if other := sorted(set(multimodal) - set(SERVED_INPUTS)):
        raise VisionLanguageUnsupported(
            f"{name}: the inputs {other} are not sliced per sequence by the fused log-prob pass (it slices "
            f"{', '.join(SERVED_INPUTS)})."
        )
    if "pixel_values" in multimodal and not {"image_grid_thw", "num_images"} <= set(multimodal):
        raise VisionLanguageUnsupported(
            f"{name}: pixel_values came without image_grid_thw and num_images (got {sorted(multimodal)}), which "
            "say which rows belong to which sequence."
        )
    backbone = base.base_model
    return VisionLanguageParts(name, backbone, base.get_decoder(), backbone.visual)


def image_patches(config: Any, token_ids: Iterable[int]) -> int:
    """The patches the images of one sequence feed the vision tower, counted from its token ids before the images are
    processed (the rows its `pixel_values` will have): each image token of a Qwen-VL sequence stands for
    `spatial_merge_size ** 2` patches (`image_grid_thw`'s product over the merge), and the processor writes one image
    token per merged patch.

    Args:
        config: The model's config (`image_token_id`, `vision_config.spatial_merge_size`).
        token_ids: The sequence's ids with each image's run of image tokens, as the processor writes them.
    """
    merge = config.vision_config.spatial_merge_size
    return sum(1 for t in token_ids if t == config.image_token_id) * merge * merge


def most_image_patches(config: Any, sequences: Iterable[Iterable[int]]) -> int:
    """The most patches any of `sequences` (token ids) feeds the vision tower (`image_patches`); 0 for a config
    without image tokens (a text model), whose `sequences` are then not read."""
    if getattr(config, "vision_config", None) is None or not hasattr(config, "image_token_id"):
        return 0
    return max((image_patches(config, ids) for ids in sequences), default=0)


def refuse_image_token_mismatch(
    config: Any, input_ids: torch.Tensor, multimodal: Mapping[str, Any], step: int
) -> None:
    """Raise where a sequence of the batch has another number of image tokens than its images give features, before
    the model fails on it with a bare count ("Image features and image tokens do not match").

    The usual cause: the policy sampled the image token into a completion. TRL keeps that token out of transformers'
    generate (`suppress_tokens`) but not out of vLLM's sampling, and then counts every image token of a sequence as a
    slot for an image feature. Only for configs whose image tokens stand for `spatial_merge_size ** 2` patches each
    (`image_patches`); others are left to the model.

    Raises:
        ValueError: Naming the step, the sequences, their token and feature counts, and the setting that keeps the
            token out of vLLM's sampling.
    """
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
    token = getattr(config, "image_token_id", None)
    if merge is None or token is None or "image_grid_thw" not in multimodal or "num_images" not in multimodal:
        return
    counts, grid = list(multimodal["num_images"]), multimodal["image_grid_thw"]
    if len(counts) != input_ids.size(0) or sum(counts) != grid.size(0):  # `ImageInputs` refuses these, naming them
        return
    features = [int(patches.sum()) // (merge * merge) for patches in grid.prod(-1).split(counts)]
    tokens = (input_ids == token).sum(-1).tolist()
    wrong = [(i, t, f) for i, (t, f) in enumerate(zip(tokens, features, strict=True)) if t != f]
    if wrong:
        shown = ", ".join(f"sequence {i}: {t} image tokens, {f} features" for i, t, f in wrong[:4])
        raise ValueError(
            f"Step {step}: {len(wrong)} of {len(tokens)} sequences have another number of image tokens (id {token}) "
            f"than their images give features ({shown}). Where a sequence has more, the policy sampled the image "
            "token into its completion, which TRL then counts as a slot for an image. Keep it out of vLLM's "
            f"sampling with generation_kwargs={{'logit_bias': {{{token}: -100}}}} (transformers' generate has it "
            "suppressed already)."
        )


class ImageInputs:
    """The image inputs of one log-prob pass over `sequences` sequences, for any mini batch of them.

    Args:
        multimodal: TRL's multimodal keywords of the pass (`SERVED_INPUTS`, `None` values dropped).
        sequences: Sequences in the pass (`input_ids.size(0)`).

    Raises:
        ValueError: `num_images` does not have one count per sequence or does not sum to the rows of
            `image_grid_thw`, or `pixel_values` does not have the rows `image_grid_thw` says (TRL's split raises
            that one).

    Example:
        >>> images = ImageInputs({"pixel_values": pv, "image_grid_thw": grid, "num_images": [1, 2]}, 2)
        >>> model.model(input_ids=ids[1:2], attention_mask=mask[1:2], **images.batch(1, 2))  # the second sequence
    """

    def __init__(self, multimodal: Mapping[str, Any], sequences: int):
        from trl.trainer.utils import split_pixel_values_by_grid

        self._tokens = {k: v for k, v in multimodal.items() if k == "mm_token_type_ids"}
        self._split: dict[str, Any] = {}
        if "pixel_values" not in multimodal:
            return
        num_images, grid = list(multimodal["num_images"]), multimodal["image_grid_thw"]
        if len(num_images) != sequences or sum(num_images) != grid.size(0):
            raise ValueError(
                f"num_images must give one image count per sequence ({sequences}) summing to the rows of "
                f"image_grid_thw ({grid.size(0)}), got {num_images}."
            )
        # TRL's own split of the batch per sequence: lists of per-sequence `pixel_values` and `image_grid_thw`.
        split = split_pixel_values_by_grid(
            {k: multimodal[k] for k in ("pixel_values", "image_grid_thw", "num_images")}
        )
        self._split = {"pixel_values": split["pixel_values"], "image_grid_thw": split["image_grid_thw"]}

    def batch(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """The keywords of the backbone for sequences `start:end`: their `pixel_values` rows and `image_grid_thw`
        rows (empty for sequences without images, as TRL's slices) and their `mm_token_type_ids` rows."""
        from trl.trainer.utils import unsplit_pixel_values_by_grid

        rows = {k: v[start:end] for k, v in self._split.items()}
        if rows:
            rows = unsplit_pixel_values_by_grid(rows)
        return {**rows, **{k: v[start:end] for k, v in self._tokens.items()}}

    def patches_per_sequence(self) -> list[int]:
        """Patches each sequence's images feed the vision tower (`pixel_values` rows); empty without images."""
        return [p.size(0) for p in self._split.get("pixel_values", [])]
