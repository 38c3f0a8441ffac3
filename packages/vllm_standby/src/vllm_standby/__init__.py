"""vllm_standby: vLLM colocated with a trainer.

Importing this package imports neither vLLM nor transformers. vLLM applies the patches itself through the
``vllm.general_plugins`` entry point (:func:`vllm_standby.plugin.register`); plain vLLM users call :func:`enable`.
"""

from vllm_standby._version import SUPPORTED_VLLM, UnsupportedVLLMVersionError, __version__, check_vllm_version
from vllm_standby.patching import PatchError, applied_patches
from vllm_standby.plugin import StandbyNotActiveError, enable, is_active, is_enabled, register

_LAZY = {
    "StandbyLLM": "vllm_standby.standby",
    "shared_hf_model": "vllm_standby.shared",
    "lora_request": "vllm_standby.lora",
    "release_kv_cache": "vllm_standby.kv_cache",
    "restore_kv_cache": "vllm_standby.kv_cache",
    "kv_cache_nbytes": "vllm_standby.kv_cache",
    "kv_standby_supported": "vllm_standby.kv_cache",
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
    "SUPPORTED_VLLM",
    "StandbyLLM",
    "PatchError",
    "StandbyNotActiveError",
    "UnsupportedVLLMVersionError",
    "__version__",
    "applied_patches",
    "check_vllm_version",
    "enable",
    "fast_start_kwargs",
    "is_active",
    "is_enabled",
    "kv_cache_nbytes",
    "kv_standby_supported",
    "lora_request",
    "register",
    "release_kv_cache",
    "restore_kv_cache",
    "shared_hf_model",
    "startup_gc_guard",
]
