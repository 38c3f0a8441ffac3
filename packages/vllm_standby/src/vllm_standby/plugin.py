"""vLLM plugin entry point: applies the patches of the installed vLLM's version range.

vLLM runs :func:`register` in every process (front end, engine core, workers) through the
``vllm.general_plugins`` entry point declared in ``pyproject.toml``, before it builds the model and the KV cache.
This module imports nothing heavy at import time; vLLM modules are imported only to patch them.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field

from vllm_standby import patches
from vllm_standby._version import (
    SUPPORTED_VLLM,
    UnsupportedVLLMVersionError,
    check_vllm_version,
    installed_vllm_version,
    is_supported,
)
from vllm_standby.patching import Patch, PatchError, undo_patch

logger = logging.getLogger(__name__)

#: Environment switch: ``1`` turns on standby for plain ``vllm.LLM`` users (like :func:`enable`), ``0`` keeps
#: :func:`register` inert. Read when :func:`register` runs.
ENV_SWITCH = "VLLM_STANDBY"


class StandbyNotActiveError(RuntimeError):
    """The vllm_standby patches are not live in this process."""


@dataclass
class _State:
    lock: threading.RLock = field(default_factory=threading.RLock)
    registered: bool = False  # register() or enable() ran to the end in this process
    inert_reason: str | None = None  # why register() applied nothing
    patches: list[Patch] = field(default_factory=list)
    range_module: str | None = None
    enabled: bool = False  # plain-vLLM standby requested (enable() or VLLM_STANDBY=1)


_STATE = _State()


def _on_platform(name: str) -> bool:
    from vllm.platforms import current_platform

    return {"cpu": current_platform.is_cpu, "cuda": current_platform.is_cuda}[name]()


def _apply_range_patches(version) -> None:
    module = patches.module_for(version)
    if module is None:  # SUPPORTED_VLLM and the range modules disagree: a bug of this package.
        raise PatchError(f"vllm_standby has no patch module for vLLM {version} although it is in {SUPPORTED_VLLM}")
    applied: list[Patch] = []
    try:
        for spec in module.PATCHES:
            if spec.platform is not None and not _on_platform(spec.platform):
                logger.debug("vllm_standby: %s.%s is %s-only; not applied", spec.module, spec.attribute, spec.platform)
                continue
            applied.append(spec.apply())
    except Exception:
        for patch in reversed(applied):
            undo_patch(patch)
        raise
    _STATE.patches = applied
    _STATE.range_module = module.__name__
    _STATE.registered = True
    _STATE.inert_reason = None


def register() -> None:
    """Apply the patches for the installed vLLM; the ``vllm.general_plugins`` entry point.

    Re-entrant: later calls in the same process do nothing. Outside the supported vLLM range it warns and stays
    inert. With ``VLLM_STANDBY=0`` it stays inert; with ``VLLM_STANDBY=1`` it also turns on standby for plain
    ``vllm.LLM`` users, like :func:`enable`.

    Raises:
        PatchError: vLLM is in the supported range but a patch target moved (a bug to report, not to ignore).
    """
    with _STATE.lock:
        if _STATE.registered or _STATE.inert_reason is not None:
            return
        switch = os.environ.get(ENV_SWITCH, "").strip()
        if switch == "0":
            _STATE.inert_reason = f"{ENV_SWITCH}=0 is set"
            logger.info("vllm_standby: %s=0, not patching vLLM", ENV_SWITCH)
            return
        version = installed_vllm_version()
        if version is None or not is_supported(version):
            _STATE.inert_reason = f"vLLM {version} is installed; vllm_standby supports {SUPPORTED_VLLM}"
            warnings.warn(f"vllm_standby stays inert: {_STATE.inert_reason}", RuntimeWarning, stacklevel=2)
            return
        _apply_range_patches(version)
        _STATE.enabled = switch == "1"
        logger.info("vllm_standby registered for vLLM %s (%d patches)", version, len(_STATE.patches))


def enable() -> None:
    """Turn on vllm_standby explicitly, for plain ``vllm.LLM`` users; call it before creating the ``LLM``.

    Applies the patches (as :func:`register` does, ignoring ``VLLM_STANDBY=0``) and turns on standby. Setting
    ``VLLM_STANDBY=1`` before vLLM starts does the same in every vLLM process, through the entry point.

    Raises:
        UnsupportedVLLMVersionError: vLLM is missing or outside the supported range.
        PatchError: a patch target moved.

    Example:
        >>> import vllm_standby
        >>> vllm_standby.enable()  # doctest: +SKIP
        >>> llm = vllm.LLM("Qwen/Qwen3-0.6B", enable_sleep_mode=True)  # doctest: +SKIP
    """
    version = check_vllm_version()
    with _STATE.lock:
        if not _STATE.registered:
            _apply_range_patches(version)
        _STATE.enabled = True
    # vLLM processes started from here on (engine core, workers) turn standby on through the entry point.
    os.environ[ENV_SWITCH] = "1"


def is_enabled() -> bool:
    """Whether standby for plain ``vllm.LLM`` was requested (:func:`enable` or ``VLLM_STANDBY=1``)."""
    return _STATE.enabled


def is_active(strict: bool = True) -> bool:
    """Check that the vllm_standby patches are live in this process.

    Args:
        strict: Raise when they are not (the default); with ``False`` return ``False`` instead.

    Returns:
        ``True`` when :func:`register` or :func:`enable` ran and all their patches are still in place.

    Raises:
        StandbyNotActiveError: with ``strict``, when the patches are not live; the message says how to fix it.
    """
    with _STATE.lock:
        problem = None
        if not _STATE.registered:
            problem = _STATE.inert_reason or "vllm_standby.plugin:register() has not run in this process"
        else:
            moved = [p.qualname for p in _STATE.patches if not p.is_live()]
            if moved:
                problem = f"patched attributes were replaced since: {', '.join(moved)}"
    if problem is None:
        return True
    if not strict:
        return False
    raise StandbyNotActiveError(
        f"vllm_standby is not active: {problem}. vLLM loads it through the `vllm.general_plugins` entry point "
        "`vllm_standby = vllm_standby.plugin:register`: check that vllm-standby is pip-installed in this "
        "environment, that VLLM_PLUGINS (when set) lists `vllm_standby`, that VLLM_STANDBY is not 0 and that vLLM is "
        f"in {SUPPORTED_VLLM}; or call vllm_standby.enable() before creating the LLM."
    )


__all__ = [
    "ENV_SWITCH",
    "StandbyNotActiveError",
    "UnsupportedVLLMVersionError",
    "enable",
    "is_active",
    "is_enabled",
    "register",
]
