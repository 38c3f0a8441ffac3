"""Argument checks for the public ops; every message names the argument and what is allowed."""

from __future__ import annotations

import math
from numbers import Real

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "torch", "triton")
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def validate_options(
    *,
    temperature: object,
    logit_scale: object,
    logit_divisor: object,
    softcap: object,
    chunk_size: object,
    backend: object,
) -> None:
    """Checks the scalar options of ``selective_logprobs``.

    Raises:
        TypeError: If a number is not a real number, or ``chunk_size`` is not an int.
        ValueError: If ``temperature <= 0``, ``softcap <= 0``, ``logit_divisor == 0``, ``chunk_size <= 0``,
            a number is not finite, or ``backend`` is unknown.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if _check_number("temperature", temperature) <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if logit_scale is not None:
        _check_number("logit_scale", logit_scale)
    if logit_divisor is not None and _check_number("logit_divisor", logit_divisor) == 0:
        raise ValueError(f"logit_divisor must be non-zero (or None), got {logit_divisor!r}")
    if softcap is not None and _check_number("softcap", softcap) <= 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def validate_tensors(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Checks shapes, dtypes, devices and target values of ``selective_logprobs``' tensors.

    The target range check reads the values, so on CUDA it synchronizes the device once.

    Raises:
        TypeError: If an argument is not a tensor, a dtype is unsupported or mismatched, or ``targets`` is not an
            integer tensor.
        ValueError: If a shape is wrong, the tensors are on different devices, or a target is outside ``[0, V)``.
    """
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        _check_tensor(name, value)
    if bias is not None:
        _check_tensor("bias", bias)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H] with at least 1 dim, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D with shape [V, H], got shape {tuple(weight.shape)}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hidden dtype must be one of {SUPPORTED_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype must match hidden dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype must match weight dtype {weight.dtype}, got {bias.dtype}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden last dim must equal weight.shape[1] (H): hidden shape {tuple(hidden.shape)}, "
            f"weight shape {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape [V] = ({vocab},), got {tuple(bias.shape)}")
    if targets.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"targets must be an integer tensor (e.g. torch.int64), got dtype {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    devices = {"hidden": hidden.device, "weight": weight.device, "targets": targets.device}
    if bias is not None:
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        raise ValueError(f"hidden, weight, targets and bias must be on one device, got {devices}")
    if targets.numel() > 0:
        low, high = targets.min().item(), targets.max().item()
        if low < 0 or high >= vocab:
            raise ValueError(f"targets values must be in [0, V) = [0, {vocab}), got min {low} and max {high}")
