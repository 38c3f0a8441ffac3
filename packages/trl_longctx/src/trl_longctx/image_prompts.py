"""Image prompts as vLLM takes them from TRL's rollout: one placeholder token per image.

TRL's colocated rollout (`VLLMGeneration.generate`) hands vLLM `{"prompt_token_ids": ..., "multi_modal_data":
{"image": ...}}` whose ids come from the processor, so each image already stands as its full run of image tokens (one
per merged patch). vLLM's multimodal processor (seen in the CPU build's 0.31 and 0.32) takes token ids unexpanded: it
replaces the first image token of the prompt for each image by that image's run, without checking whether the run is
there. The prompt it decodes from then carries the run's other tokens as extra text and shifted positions, and the
rollout samples from another distribution than the trainer scores, with no error. The trainer hands vLLM one token per
image (`one_token_per_image`), which vLLM expands into the same run: for its own shared engine
(`vllm_shared.AdapterStandbyLLM`) and for TRL's (`wrap_engine_generate`).
"""

from __future__ import annotations

import functools
from typing import Any


def one_token_per_image(prompts: Any, image_token_id: int | None) -> Any:
    """`prompts` with each image's run of `image_token_id` tokens collapsed to one token (module docstring).

    Only token-id prompts with images change (copies; the caller's are not modified); prompts without images, text
    prompts, and everything when `image_token_id` is `None` (a model without an image token) pass as they are. Two
    images whose runs touch would become one token (vLLM then refuses the prompt, naming the count): the Qwen-VL chat
    templates put every image between its own vision start and end tokens.
    """
    if image_token_id is None or not isinstance(prompts, list | tuple):
        return prompts
    collapsed = []
    for prompt in prompts:
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if ids is None or "image" not in (prompt.get("multi_modal_data") or {}):
            collapsed.append(prompt)
            continue
        ids = list(ids)
        kept = [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]
        collapsed.append({**prompt, "prompt_token_ids": kept})
    return collapsed


def wrap_engine_generate(llm: Any) -> None:
    """Make `llm.generate` (a `vllm.LLM` TRL built) hand vLLM one token per image (`one_token_per_image`); the image
    token is the model config's `image_token_id`. An engine of a model without one, or already wrapped, is left as it
    is."""
    generate = llm.generate
    image_token_id = getattr(llm.llm_engine.model_config.hf_config, "image_token_id", None)
    if image_token_id is None or getattr(generate, "__one_token_per_image__", False):
        return

    @functools.wraps(generate)
    def generate_with_one_token_per_image(prompts: Any, *args: Any, **kwargs: Any) -> Any:
        return generate(one_token_per_image(prompts, image_token_id), *args, **kwargs)

    generate_with_one_token_per_image.__one_token_per_image__ = True
    llm.generate = generate_with_one_token_per_image
