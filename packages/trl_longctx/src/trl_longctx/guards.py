"""Guards that turn silent failures of a GRPO run into clear errors: non-finite values, bad rewards, long prompts.

Every check names the step and the tensor or function at fault. With `skip_nonfinite_steps=True` a non-finite loss
skips the step (zero gradient, a warning and the `nonfinite_skipped` metric) and a non-finite reward marks that
completion unscorable (TRL gives it a zero advantage), instead of raising.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .memory.shapes import text_config

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A NaN or Inf in a log-prob, loss or reward tensor of a training step."""


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names the function and the step."""


def describe_nonfinite(tensor: torch.Tensor) -> str:
    """Count the NaN and Inf entries of `tensor` and give the first bad index, for error messages."""
    values = tensor.detach()
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    first = torch.nonzero(~torch.isfinite(values))[0].tolist() if nan + inf else []
    return f"{nan} NaN and {inf} Inf of {values.numel()} values (first at index {first}, shape {list(values.shape)})"


def check_finite(tensor: torch.Tensor, what: str, step: int, *, skip: bool) -> bool:
    """Return `True` if `tensor` is all finite; otherwise raise, or warn and return `False` when `skip` is set.

    One host-device sync per call (a scalar `all()`), no copy of the tensor.

    Raises:
        NonFiniteError: If `tensor` holds a NaN or Inf and `skip` is `False`.
    """
    if bool(torch.isfinite(tensor.detach()).all()):
        return True
    message = f"Non-finite {what} at training step {step}: {describe_nonfinite(tensor)}."
    if not skip:
        raise NonFiniteError(message + " Set skip_nonfinite_steps=True to skip such steps instead.")
    logger.warning("%s Skipping (skip_nonfinite_steps=True).", message)
    return False


def guard_loss(loss: torch.Tensor, model: nn.Module, step: int, *, skip: bool, accelerator=None) -> torch.Tensor:
    """Return `loss` if it is finite on every process; otherwise raise, or return a zero loss when `skip` is set.

    The decision is taken jointly (a min-reduce over processes) so that all ranks raise or skip the same step. The
    zero loss is `0 * sum(p.sum())` over the trainable parameters: every parameter gets an exact zero gradient (never
    NaN through the bad graph), and DDP/FSDP still see a gradient for every parameter. Note that the optimizer still
    steps with that zero gradient (Adam's momentum moves the weights a little).

    Raises:
        NonFiniteError: If the loss is NaN or Inf on some process and `skip` is `False`.
    """
    local = bool(torch.isfinite(loss.detach()).all())
    everywhere = local
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.gather(torch.tensor([float(local)], device=loss.device))
        everywhere = bool(flags.min() > 0)
    if everywhere:
        return loss
    detail = describe_nonfinite(loss) if not local else "finite here, non-finite on another process"
    message = f"Non-finite loss at training step {step}: {detail}."
    if not skip:
        raise NonFiniteError(message + " Set skip_nonfinite_steps=True to skip such steps instead.")
    logger.warning("%s Skipping the step (zero gradient; skip_nonfinite_steps=True).", message)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.sum() for p in trainable) * 0.0


class GuardedRewardFunction:
    """Wrap a synchronous reward function: its errors and non-finite outputs name it and the training step.

    Args:
        func: `f(prompts, completions, **kw) -> list[float | None]`, as TRL calls it (keyword arguments).
        name: The name TRL logs it under.
        step: Returns the current training step (1-based, the step being computed).
        skip: Returns whether non-finite rewards become `None` (unscorable) instead of raising.
    """

    def __init__(self, func: Callable, name: str, step: Callable[[], int], skip: Callable[[], bool]):
        self.func, self.name, self._step, self._skip = func, name, step, skip
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        try:
            rewards = self.func(*args, **kwargs)
        except Exception as error:
            raise RewardFunctionError(
                f"Reward function {self.name!r} raised {type(error).__name__} at training step {self._step()}: {error}"
            ) from error
        expected = len(kwargs["prompts"]) if "prompts" in kwargs else None
        rewards = self._as_list(rewards, expected)
        bad = [i for i, r in enumerate(rewards) if r is not None and not math.isfinite(float(r))]
        if not bad:
            return rewards
        message = (
            f"Reward function {self.name!r} returned non-finite rewards at training step {self._step()}: "
            f"{len(bad)} of {len(rewards)} (first: index {bad[0]}, value {rewards[bad[0]]!r})."
        )
        if not self._skip():
            raise NonFiniteError(message + " Return None for an unscorable completion, or set skip_nonfinite_steps.")
        logger.warning("%s Treated as unscorable (skip_nonfinite_steps=True).", message)
        return [None if i in set(bad) else r for i, r in enumerate(rewards)]

    def _as_list(self, rewards, expected: int | None) -> list:
        """`rewards` as a list of floats and `None`s, as TRL accepts them: a list, a tuple, or a 1-D numpy array or
        tensor (TRL turns any of these into a tensor); anything else, a wrong length or a non-number raises."""
        if hasattr(rewards, "tolist") and getattr(rewards, "ndim", None) == 1:  # numpy array, torch tensor
            rewards = rewards.tolist()
        if (
            not isinstance(rewards, Sequence)
            or isinstance(rewards, str)
            or (expected is not None and len(rewards) != expected)
        ):
            listed = isinstance(rewards, Sequence) and not isinstance(rewards, str)
            got = f"{len(rewards)} rewards" if listed else type(rewards).__name__
            if getattr(rewards, "ndim", 1) == 0:
                got = f"a single {type(rewards).__name__}"
            elif getattr(rewards, "ndim", 1) != 1:
                got = f"an array of shape {tuple(rewards.shape)}"
            raise ValueError(
                f"Reward function {self.name!r} returned {got} at training step {self._step()}; expected "
                f"{expected if expected is not None else 'one'} rewards (one float or None per completion) as a "
                "list, tuple, or 1-D numpy array or tensor."
            )
        for index, reward in enumerate(rewards):
            if reward is not None and not isinstance(reward, numbers.Real):
                raise ValueError(
                    f"Reward function {self.name!r} returned {reward!r} ({type(reward).__name__}) at index {index} "
                    f"at training step {self._step()}; a reward is a float, or None for an unscorable completion."
                )
        return list(rewards)


def guard_reward_functions(trainer) -> None:
    """Replace each synchronous Python reward function of `trainer` by a `GuardedRewardFunction` (in place).

    Reward models (`nn.Module`) and async functions are left as they are.
    """
    step = lambda: trainer.state.global_step + 1  # noqa: E731
    skip = lambda: trainer.args.skip_nonfinite_steps  # noqa: E731
    for index, (func, name) in enumerate(zip(trainer.reward_funcs, trainer.reward_func_names, strict=True)):
        if isinstance(func, nn.Module | GuardedRewardFunction):
            continue
        if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__):
            continue
        trainer.reward_funcs[index] = GuardedRewardFunction(func, name, step, skip)


# RoPE types whose `max_position_embeddings` is already the scaled context (vLLM's rule: they are not multiplied).
_ROPE_TYPES_UNSCALED = ("su", "longrope", "llama3", "default", "mrope")


def context_length_limit(config) -> int | None:
    """The longest prompt + completion the model takes, in tokens, as vLLM derives it from the config.

    `max_position_embeddings`, or for RoPE scaling by a factor (YaRN, linear, dynamic) the unscaled length times the
    factor when that is longer: YaRN configs of Qwen3 keep `max_position_embeddings=40960` beside
    `rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`, i.e. 131,072.
    `None` when the config gives no length.
    """
    text = text_config(config)
    limit = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if not limit or not factor or rope_type in _ROPE_TYPES_UNSCALED:
        return limit
    base = rope.get("original_max_position_embeddings") if rope_type == "yarn" else None
    return max(limit, int((base or limit) * factor))


def check_prompt_lengths(prompts: list, prompt_ids: list, max_completion_length: int, config) -> None:
    """Refuse prompts that, with `max_completion_length` new tokens, run past the model's context
    (`context_length_limit`).

    Raises:
        ValueError: Naming the longest prompt's length, `max_completion_length` and the model's context.
    """
    limit = context_length_limit(config)
    if not limit or not prompt_ids:
        return
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    length = len(prompt_ids[longest])
    if length + max_completion_length > limit:
        preview = str(prompts[longest])[:60]
        text = text_config(config)
        what = f"max_position_embeddings={limit}"
        if limit != text.max_position_embeddings:
            what = f"context of {limit} tokens (max_position_embeddings with its RoPE scaling)"
        raise ValueError(
            f"A prompt of {length} tokens plus max_completion_length={max_completion_length} exceeds the model's "
            f"{what} (prompt starts {preview!r}). Shorten or filter the prompts, or lower max_completion_length."
        )


def check_train_dataset(dataset) -> None:
    """Refuse an empty training dataset or one without a `prompt` column, before any model is loaded.

    Raises:
        ValueError: Naming `train_dataset` and what it lacks.
    """
    if dataset is None or not hasattr(dataset, "__len__"):
        return  # TRL's own checks cover None and iterable datasets
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty: it needs at least one row with a 'prompt' column.")
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(f"train_dataset needs a 'prompt' column; its columns are {columns}.")
