"""One helper to patch other libraries: records the original, refuses double patching, logs, can undo.

Every change this package makes to vLLM goes through :func:`apply_patch`, so that the set of live patches is
known (:func:`applied_patches`), checked (:func:`vllm_standby.is_active`) and reversible
(:func:`undo_patch`, :func:`vllm_standby.disable`). A version-range module describes its patches with
:class:`PatchSpec`, whose :meth:`PatchSpec.apply` checks the target's signature and pinned source hash before it
replaces anything; the contract tests read the same specs.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from packaging.version import Version

from vllm_standby import _version
from vllm_standby._version import base_version

logger = logging.getLogger(__name__)

_MISSING = object()
_LOCK = threading.RLock()
# (id(target), name) -> Patch, in application order.
_APPLIED: dict[tuple[int, str], Patch] = {}


def _get(target: Any, name: str) -> Any:
    # On a class, read the raw attribute (a staticmethod or classmethod object), so that undo restores it as is.
    if isinstance(target, type):
        return inspect.getattr_static(target, name, _MISSING)
    return getattr(target, name, _MISSING)


class PatchError(RuntimeError):
    """A patch could not be applied or undone (missing target, double patching, changed attribute)."""


@dataclass(frozen=True)
class Patch:
    """A live patch: ``target.name`` was ``original`` and is now ``replacement``.

    Attributes:
        target: The patched object (a module or a class).
        name: The attribute name on ``target``.
        original: The attribute before patching (``None`` with ``existed=False`` when it did not exist).
        replacement: The attribute now.
        reason: Why, in one line (logged).
        existed: Whether ``target`` had the attribute before.
    """

    target: Any
    name: str
    original: Any
    replacement: Any
    reason: str = ""
    existed: bool = True

    @property
    def qualname(self) -> str:
        """``module.attribute`` or ``module.Class.attribute`` of the patched attribute."""
        owner = getattr(self.target, "__qualname__", None)
        module = getattr(self.target, "__module__", None) if owner else getattr(self.target, "__name__", "?")
        return ".".join(part for part in (module, owner, self.name) if part)

    def is_live(self) -> bool:
        """Whether ``target.name`` still is ``replacement``."""
        return _get(self.target, self.name) is self.replacement


def apply_patch(target: Any, name: str, replacement: Any, *, reason: str = "", allow_new: bool = False) -> Patch:
    """Set ``target.name = replacement`` and record the original.

    Args:
        target: Module or class to patch.
        name: Attribute to replace.
        replacement: New value.
        reason: One line saying why; logged and kept on the record.
        allow_new: Allow adding an attribute that does not exist yet. Off by default so that a renamed upstream
            attribute fails here instead of silently adding a dead one.

    Returns:
        The :class:`Patch` record.

    Raises:
        PatchError: ``target.name`` is already patched, or it does not exist and ``allow_new`` is false.

    Example:
        >>> import types
        >>> ns = types.SimpleNamespace(f=len)
        >>> p = apply_patch(ns, "f", abs, reason="demo")
        >>> ns.f is abs
        True
        >>> undo_patch(p); ns.f is len
        True
    """
    with _LOCK:
        key = (id(target), name)
        if key in _APPLIED:
            raise PatchError(f"{_APPLIED[key].qualname} is already patched; undo the patch before patching it again")
        original = _get(target, name)
        if original is _MISSING and not allow_new:
            raise PatchError(f"cannot patch {target!r}.{name}: the attribute does not exist (has upstream moved it?)")
        setattr(target, name, replacement)
        patch = Patch(
            target=target,
            name=name,
            original=None if original is _MISSING else original,
            replacement=replacement,
            reason=reason,
            existed=original is not _MISSING,
        )
        _APPLIED[key] = patch
    logger.info("vllm_standby patched %s: %s", patch.qualname, reason or "(no reason given)")
    return patch


def undo_patch(patch: Patch) -> None:
    """Restore the original attribute of ``patch`` (:func:`vllm_standby.disable`, tests).

    Args:
        patch: A record returned by :func:`apply_patch`.

    Raises:
        PatchError: The patch is not live: undone already, or someone else replaced the attribute since.
    """
    with _LOCK:
        key = (id(patch.target), patch.name)
        if _APPLIED.get(key) is not patch:
            raise PatchError(f"{patch.qualname} is not patched by this record")
        if not patch.is_live():
            raise PatchError(f"{patch.qualname} was replaced by someone else since it was patched; not restoring it")
        if patch.existed:
            setattr(patch.target, patch.name, patch.original)
        else:
            delattr(patch.target, patch.name)
        del _APPLIED[key]
    logger.info("vllm_standby restored %s", patch.qualname)


def applied_patches() -> list[Patch]:
    """Return the live patch records, in application order."""
    with _LOCK:
        return list(_APPLIED.values())


def source_sha256(obj: Callable[..., Any]) -> str:
    """SHA-256 of the dedented source of ``obj``: pinned per vLLM version to notice upstream changes."""
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(obj)))
    return hashlib.sha256(source.encode()).hexdigest()


def is_patched(target: Any, name: str) -> bool:
    """Whether ``target.name`` is patched through :func:`apply_patch` now."""
    with _LOCK:
        return (id(target), name) in _APPLIED


@dataclass(frozen=True)
class PatchSpec:
    """Description of one patch of a version-range module, read by the module and by its contract test.

    Attributes:
        module: Dotted module path holding the target, e.g. ``"vllm.model_executor.layers.utils"``.
        attribute: Attribute replaced in that module (``"Class.method"`` for a method).
        make_replacement: Called with the original; returns the replacement.
        reason: Why the patch exists.
        remove_when: When it can be deleted.
        upstream: Upstream file/issue reference.
        signature: ``str(inspect.signature(original))`` that the replacement relies on.
        source_sha256: Hash of the original's source (:func:`source_sha256`) per vLLM release it was reviewed on
            (``"0.31.0"``). :meth:`apply` refuses a release without an entry here, or with another hash.
        platform: ``"cpu"`` or ``"cuda"`` to apply only on that vLLM platform; ``None`` for all platforms.
    """

    module: str
    attribute: str
    make_replacement: Callable[[Any], Any]
    reason: str
    remove_when: str
    upstream: str
    signature: str
    source_sha256: dict[str, str] = field(default_factory=dict)
    platform: str | None = None

    @property
    def target(self) -> str:
        """``module.attribute`` of the target, for messages."""
        return f"{self.module}.{self.attribute}"

    def resolve(self) -> tuple[Any, str]:
        """Import the module and return ``(owner, attribute name)`` of the target."""
        owner: Any = importlib.import_module(self.module)
        *path, name = self.attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, name

    def original(self) -> Any:
        """The unpatched target (from the patch record when it is live)."""
        owner, name = self.resolve()
        live = _APPLIED.get((id(owner), name))
        return live.original if live is not None else getattr(owner, name)

    def verify(self, original: Any, version: Version) -> None:
        """Check that ``original`` is what this patch was reviewed against on vLLM ``version``.

        Args:
            original: The target as vLLM ships it (``getattr(owner, name)``: a classmethod as its bound method).
            version: The installed vLLM version; its base version (``0.31.0`` for ``0.31.0+cpu``) keys the hashes.

        Raises:
            PatchError: The signature differs from :attr:`signature`, no hash is pinned for ``version``, or the
                source hash differs from the pinned one. The message names the target, the version, the expected
                and found values, and what to do.
        """
        base = base_version(version).public
        found_signature = str(inspect.signature(original))
        if found_signature != self.signature:
            raise PatchError(
                f"vllm_standby refuses to patch {self.target} on vLLM {version}: its signature is "
                f"{found_signature}, the patch was written for {self.signature}. The replacement may not fit; "
                "report it, or install a vLLM the patch was verified on "
                f"({', '.join(sorted(self.source_sha256, key=Version)) or 'none'})."
            )
        found = source_sha256(original)
        pinned = self.source_sha256.get(base)
        if pinned is None:
            raise PatchError(
                f"vllm_standby refuses to patch {self.target} on vLLM {version}: the patch was verified on vLLM "
                f"{', '.join(sorted(self.source_sha256, key=Version)) or 'none'} only (source sha256 found here: "
                f"{found}). Install one of those, or review the target against the patch and pin {base!r}: "
                f"{found!r} in its PatchSpec.source_sha256."
            )
        if found != pinned:
            raise PatchError(
                f"vllm_standby refuses to patch {self.target} on vLLM {version}: its source changed (sha256 expected "
                f"{pinned}, found {found}). A build of vLLM {base} with modified sources? Review the target against "
                "the patch, or reinstall the released vLLM."
            )

    def apply(self, version: Version | None = None) -> Patch:
        """Verify the target (:meth:`verify`), then apply this patch through :func:`apply_patch`.

        Args:
            version: The vLLM version to verify against; default the installed one.

        Returns:
            The :class:`Patch` record.

        Raises:
            PatchError: The target is already patched, or :meth:`verify` refuses it. Nothing is replaced then.
        """
        owner, name = self.resolve()
        if is_patched(owner, name):
            raise PatchError(f"{self.target} is already patched; undo the patch before patching it again")
        if version is None:
            version = _version.installed_vllm_version()
            if version is None:
                raise PatchError(f"cannot verify {self.target}: no vLLM distribution is installed")
        original = getattr(owner, name)
        self.verify(original, version)
        return apply_patch(owner, name, self.make_replacement(original), reason=self.reason)
