import pytest

from trl_longctx.tasks import FILLER_WORDS, copy_letter_reward, get_task, make_copy_letter_dataset


def test_copy_letter_reward_is_exact():
    rewards = copy_letter_reward(["copy: a"] * 4, ["aaaa", "abab", "", "zzz"], target=["a", "a", "a", "a"])
    assert rewards == [1.0, 0.5, 0.0, 0.0]


def test_dataset_columns_and_determinism():
    first, second = make_copy_letter_dataset(16, seed=3), make_copy_letter_dataset(16, seed=3)
    assert first.column_names == ["prompt", "target"]
    assert first["prompt"] == second["prompt"]
    assert all(p == f"copy: {t}" for p, t in zip(first["prompt"], first["target"], strict=True))


def test_prompt_words_prefix_a_document_of_that_many_words():
    rows = make_copy_letter_dataset(8, seed=1, prompt_words=500)
    for prompt, target in zip(rows["prompt"], rows["target"], strict=True):
        document, instruction = prompt.split("\n")
        assert instruction == f"copy: {target}"
        assert len(document.split(" ")) == 500 and set(document.split(" ")) <= set(FILLER_WORDS)
    assert rows["target"] == make_copy_letter_dataset(8, seed=1)["target"]  # the letters do not depend on the length
    assert rows["prompt"] == make_copy_letter_dataset(8, seed=1, prompt_words=500)["prompt"]
    assert len(set(rows["prompt"])) == 8


def test_bad_task_inputs():
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("nope")
    with pytest.raises(ValueError, match="num_prompts"):
        make_copy_letter_dataset(0)
    with pytest.raises(ValueError, match="prompt_words must be >= 0, got -1"):
        make_copy_letter_dataset(4, prompt_words=-1)
