"""`image_prompts.one_token_per_image`: each image's run of image tokens collapsed to the one token vLLM expands;
everything else passes unchanged. (The run against vLLM itself: `tests/test_vision_vllm.py` at the repository root,
where the rollouts' log-probs equal the trainer's.)"""

from trl_longctx.image_prompts import one_token_per_image

IMAGE = 50


def test_each_images_run_becomes_one_token():
    prompts = [
        {"prompt_token_ids": [1, 52, IMAGE, IMAGE, IMAGE, IMAGE, 53, 7, 52, IMAGE, IMAGE, 53, 9], "multi_modal_data":
         {"image": ["first", "second"]}},
        {"prompt_token_ids": [IMAGE, IMAGE, 3], "multi_modal_data": {"image": "only"}},
    ]  # fmt: skip
    given = [dict(p) for p in prompts]
    collapsed = one_token_per_image(prompts, IMAGE)
    assert [p["prompt_token_ids"] for p in collapsed] == [[1, 52, IMAGE, 53, 7, 52, IMAGE, 53, 9], [IMAGE, 3]]
    assert [p["multi_modal_data"] for p in collapsed] == [p["multi_modal_data"] for p in given]
    assert prompts == given  # the caller's prompts are not modified


def test_prompts_without_images_or_image_token_pass_unchanged():
    text_only = [{"prompt_token_ids": [IMAGE, IMAGE, 3]}, "a text prompt", {"prompt": "x", "multi_modal_data": {}}]
    assert one_token_per_image(text_only, IMAGE) == text_only
    with_image = [{"prompt_token_ids": [IMAGE, IMAGE], "multi_modal_data": {"image": "img"}}]
    assert one_token_per_image(with_image, None) is with_image
    assert one_token_per_image("a single text prompt", IMAGE) == "a single text prompt"
