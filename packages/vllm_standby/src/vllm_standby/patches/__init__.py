"""vLLM patches, one module per supported version range.

Each module declares ``VLLM_RANGE`` (a ``SpecifierSet``) and ``PATCHES`` (a tuple of
:class:`vllm_standby.patching.PatchSpec`), and documents every patch (target, reason, upstream, when to remove) in
its docstring. Modules import nothing from vLLM at import time.

- :mod:`vllm_standby.patches.vllm_0_25`: vLLM >=0.25,<0.29 (no patches yet).
- :mod:`vllm_standby.patches.vllm_0_31`: vLLM >=0.29,<0.32 (CPU: keep plain linear weights).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from packaging.version import Version

RANGE_MODULES = ("vllm_standby.patches.vllm_0_25", "vllm_standby.patches.vllm_0_31")


def module_for(version: Version) -> ModuleType | None:
    """Return the patch module whose ``VLLM_RANGE`` holds ``version`` (dev/local builds included), else ``None``."""
    base = Version(version.base_version)
    for name in RANGE_MODULES:
        module = importlib.import_module(name)
        if module.VLLM_RANGE.contains(base, prereleases=True):
            return module
    return None
