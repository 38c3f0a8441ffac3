"""Built-in verifiable tasks: a dataset with a `prompt` column and a reward computed exactly (no model judge).

The quickstart's task is `copy_letter`: the prompt names a letter, the reward is the fraction of the completion's
characters that are that letter. A random model scores about 1/48; a model that learned to copy scores 1. With
`prompt_words`, each prompt opens with a document of that many filler words (long-context runs without a data set of
one's own: the instruction comes last, after the whole document).
"""

from __future__ import annotations

import random
from collections.abc import Callable

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


TASKS: dict[str, tuple[Callable, Callable]] = {
    "copy_letter": (make_copy_letter_dataset, copy_letter_reward),
}


def get_task(name: str) -> tuple[Callable, Callable]:
    """Return `(make_dataset, reward_function)` of a built-in task.

    Raises:
        ValueError: If `name` is not one of `TASKS`.
    """
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}.")
    return TASKS[name]
