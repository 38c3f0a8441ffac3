"""Patches for vLLM 0.25 to 0.28 (the CUDA build on the GPU image).

Index: none yet. The CPU weight-repacking patch of :mod:`vllm_standby.patches.vllm_0_31` is not needed on CUDA,
where linear weights stay plain parameters. Standby on CUDA goes through vLLM's own CuMem allocator
(``LLM.sleep(level=1)`` with ``enable_sleep_mode=True``), without patches.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from vllm_standby.patching import PatchSpec

VLLM_RANGE = SpecifierSet(">=0.25,<0.29")

PATCHES: tuple[PatchSpec, ...] = ()
