"""vllm_standby: vLLM colocated with a trainer.

Importing this package imports neither vLLM nor transformers. vLLM applies the patches itself through the
``vllm.general_plugins`` entry point (:func:`vllm_standby.plugin.register`); plain vLLM users call :func:`enable`.
"""

from vllm_standby._version import SUPPORTED_VLLM, UnsupportedVLLMVersionError, __version__, check_vllm_version
from vllm_standby.patching import PatchError, applied_patches
from vllm_standby.plugin import StandbyNotActiveError, enable, is_active, is_enabled, register

__all__ = [
    "SUPPORTED_VLLM",
    "PatchError",
    "StandbyNotActiveError",
    "UnsupportedVLLMVersionError",
    "__version__",
    "applied_patches",
    "check_vllm_version",
    "enable",
    "is_active",
    "is_enabled",
    "register",
]
