"""Built-in verifiable tasks: a dataset with a `prompt` column and a reward computed exactly (no model judge).

The quickstart's task is `copy_letter`: the prompt names a letter, the reward is the fraction of the completion's
characters that are that letter. A random model scores about 1/48; a model that learned to copy scores 1. With
`prompt_words`, each prompt opens with a document of that many filler words (long-context runs without a data set of
one's own: the instruction comes last, after the whole document).

`count_squares` is a vision task for vision-language models (`TASKS[name].vision`; `longctx-grpo train` refuses it
for a text-only model before loading it): each image, drawn in code, holds 1 to 4 filled squares; the reward is 1 for
a completion that is exactly their number. Its rows have TRL's vision format: a conversational `prompt` whose user
message holds an image placeholder and the question (after the filler document, with `prompt_words`), and an `image`
column (TRL puts the image into the placeholder).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple

LETTERS = "abcd"
# Filler words of `prompt_words` documents: common lowercase English words, one token each in the usual BPE
# vocabularies (with their leading space), so a document of N words is about N tokens.
FILLER_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "not",
    "but",
    "their",
    "one",
    "all",
    "its",
    "new",
    "after",
    "first",
    "two",
    "who",
    "also",
    "they",
    "been",
    "more",
    "other",
    "time",
    "years",
    "when",
    "into",
    "over",
    "most",
    "some",
]


def make_copy_letter_dataset(num_prompts: int, seed: int = 0, letters: str = LETTERS, prompt_words: int = 0):
    """Build the `copy_letter` dataset.

    Args:
        num_prompts: Number of rows.
        seed: Seed of the letter choice and of the filler documents.
        letters: Letters to draw from.
        prompt_words: Filler words before each instruction (a document of `FILLER_WORDS` drawn at random, then a
            newline); 0: the instruction alone.

    Returns:
        A `datasets.Dataset` with columns `prompt` (e.g. `"copy: c"`, or `"<document>\ncopy: c"`) and `target`
        (e.g. `"c"`).

    Raises:
        ValueError: If `num_prompts` < 1, `letters` is empty or `prompt_words` < 0.
    """
    from datasets import Dataset

    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}.")
    if not letters:
        raise ValueError("letters must name at least one letter.")
    if prompt_words < 0:
        raise ValueError(f"prompt_words must be >= 0, got {prompt_words}.")
    rng = random.Random(seed)
    targets = [rng.choice(letters) for _ in range(num_prompts)]
    prompts = [f"copy: {t}" for t in targets]
    if prompt_words:
        prompts = [" ".join(rng.choices(FILLER_WORDS, k=prompt_words)) + "\n" + p for p in prompts]
    return Dataset.from_dict({"prompt": prompts, "target": targets})


def copy_letter_reward(prompts: list[str], completions: list[str], target: list[str], **kwargs) -> list[float]:
    """Reward of `copy_letter`: the fraction of completion characters equal to the target letter.

    Follows TRL's reward function signature; `target` comes from the dataset column of that name.

    Returns:
        One float in [0, 1] per completion (0 for an empty completion).
    """
    return [sum(ch == t for ch in c) / len(c) if c else 0.0 for c, t in zip(completions, target, strict=True)]


COUNT_SQUARES_QUESTION = "how many squares?"
# The canvas is a grid of cells with at most one square each, so squares never touch: 4 x 4 cells of 14 pixels on a
# 56-pixel canvas (Qwen2.5-VL's 2 x 2 merged 14-pixel patches: 4 image tokens).
CANVAS_CELLS, CELL_PIXELS, SQUARE_PIXELS = 4, 14, 9


def draw_squares(count: int, rng: random.Random):
    """A `CANVAS_CELLS * CELL_PIXELS` pixel square RGB image with `count` filled squares of random colours on black,
    each in its own grid cell at a random offset.

    Raises:
        ValueError: If `count` is not in [0, CANVAS_CELLS**2].
    """
    from PIL import Image, ImageDraw

    if not 0 <= count <= CANVAS_CELLS**2:
        raise ValueError(f"count must be in [0, {CANVAS_CELLS**2}] (one square per grid cell), got {count}.")
    size = CANVAS_CELLS * CELL_PIXELS
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for cell in rng.sample(range(CANVAS_CELLS**2), count):
        left = (cell % CANVAS_CELLS) * CELL_PIXELS + rng.randrange(CELL_PIXELS - SQUARE_PIXELS + 1)
        top = (cell // CANVAS_CELLS) * CELL_PIXELS + rng.randrange(CELL_PIXELS - SQUARE_PIXELS + 1)
        colour = tuple(rng.randrange(96, 256) for _ in range(3))
        draw.rectangle((left, top, left + SQUARE_PIXELS - 1, top + SQUARE_PIXELS - 1), fill=colour)
    return image


def make_count_squares_dataset(num_prompts: int, seed: int = 0, max_squares: int = 4, prompt_words: int = 0):
    """Build the `count_squares` dataset (images drawn in code, nothing downloaded; needs Pillow).

    Args:
        num_prompts: Number of rows.
        seed: Seed of the counts, positions and colours.
        max_squares: Counts are drawn from 1 to this.
        prompt_words: Filler words (as `copy_letter`'s) before the question in each prompt's text; 0: the question
            alone.

    Returns:
        A `datasets.Dataset` with columns `prompt` (`[{"role": "user", "content": [{"type": "image"}, {"type":
        "text", "text": "how many squares?"}]}]`), `image` (a PIL image) and `target` (the count, e.g. `"3"`).

    Raises:
        ValueError: If `num_prompts` < 1, `max_squares` is not in [1, 16] or `prompt_words` < 0.
    """
    from datasets import Dataset

    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}.")
    if not 1 <= max_squares <= CANVAS_CELLS**2:
        raise ValueError(f"max_squares must be in [1, {CANVAS_CELLS**2}], got {max_squares}.")
    if prompt_words < 0:
        raise ValueError(f"prompt_words must be >= 0, got {prompt_words}.")
    rng = random.Random(seed)
    counts = [rng.randint(1, max_squares) for _ in range(num_prompts)]
    images = [draw_squares(count, rng) for count in counts]
    texts = [COUNT_SQUARES_QUESTION] * num_prompts
    if prompt_words:
        texts = [" ".join(rng.choices(FILLER_WORDS, k=prompt_words)) + "\n" + t for t in texts]
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}] for t in texts]
    return Dataset.from_dict({"prompt": prompts, "image": images, "target": [str(count) for count in counts]})


def count_squares_reward(completions: list, target: list[str], **kwargs) -> list[float]:
    """Reward of `count_squares`: 1.0 for a completion that is exactly the number of squares (surrounding spaces
    ignored), else 0.0.

    Follows TRL's reward function signature; completions are conversational (`[{"role": "assistant", "content":
    ...}]`) or plain strings.
    """
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(text.strip() == t) for text, t in zip(texts, target, strict=True)]


class Task(NamedTuple):
    """A built-in task: `make_dataset(num_prompts, seed=..., prompt_words=...)`, its exact reward function, and
    whether its prompts hold images (a vision-language model is then needed)."""

    make_dataset: Callable
    reward: Callable
    vision: bool = False


TASKS: dict[str, Task] = {
    "copy_letter": Task(make_copy_letter_dataset, copy_letter_reward),
    "count_squares": Task(make_count_squares_dataset, count_squares_reward, vision=True),
}


def get_task(name: str) -> Task:
    """Return the built-in task `name` (unpacks as `make_dataset, reward, vision`).

    Raises:
        ValueError: If `name` is not one of `TASKS`.
    """
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}.")
    return TASKS[name]
