"""vLLM patches, one module per supported version range; together they cover ``vllm_standby.SUPPORTED_VLLM``.

Each module declares ``VLLM_RANGE`` (a ``SpecifierSet``) and ``PATCHES`` (a tuple of
:class:`vllm_standby.patching.PatchSpec`, each with the source hashes it was verified on), and documents every
patch (target, reason, upstream, when to remove, what was verified) in its docstring. The targets and their
replacements are in :mod:`vllm_standby.patches._targets`. Modules import nothing from vLLM at import time.

- :mod:`vllm_standby.patches.vllm_0_25`: vLLM >=0.25,<0.29: in-memory LoRA; KV-only sleep backend (CUDA).
- :mod:`vllm_standby.patches.vllm_0_29`: vLLM >=0.29,<0.31: in-memory LoRA; KV-only sleep backend (CUDA).
- :mod:`vllm_standby.patches.vllm_0_31`: vLLM >=0.31,<0.32: plain CPU weights; in-memory LoRA.
- :mod:`vllm_standby.patches.vllm_0_32`: vLLM >=0.32,<0.33: plain CPU weights; in-memory LoRA.
- :mod:`vllm_standby.patches.vllm_0_33`: vLLM >=0.33,<0.35: in-memory LoRA.

From 0.31 vLLM releases the KV cache itself (``LLM.release_kv_cache_memory``), so the sleep-backend patch ends with
0.30.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from packaging.version import Version

from vllm_standby.patches._targets import KV_SLEEP_BACKEND_TARGET

RANGE_MODULES = (
    "vllm_standby.patches.vllm_0_25",
    "vllm_standby.patches.vllm_0_29",
    "vllm_standby.patches.vllm_0_31",
    "vllm_standby.patches.vllm_0_32",
    "vllm_standby.patches.vllm_0_33",
)


def range_modules() -> list[ModuleType]:
    """The version-range modules, in version order."""
    return [importlib.import_module(name) for name in RANGE_MODULES]


def module_for(version: Version | None) -> ModuleType | None:
    """Return the patch module whose ``VLLM_RANGE`` holds ``version`` (dev/local builds included), else ``None``."""
    if version is None:
        return None
    base = Version(version.base_version)
    for module in range_modules():
        if module.VLLM_RANGE.contains(base, prereleases=True):
            return module
    return None


def provides_kv_sleep_backend(module: ModuleType | None) -> bool:
    """Whether ``module`` patches vLLM's sleep-mode backend factory (KV-only standby through ``LLM.sleep``, CUDA)."""
    return module is not None and any((s.module, s.attribute) == KV_SLEEP_BACKEND_TARGET for s in module.PATCHES)
