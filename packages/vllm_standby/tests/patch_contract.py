"""The contract tests every vLLM patch gets, for any version-range module: they fail loudly when upstream moves.

They read the same `PatchSpec` data that `PatchSpec.apply()` verifies at apply time (signature, source hash pinned
per vLLM release).
"""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import vllm_standby
from vllm_standby.patching import source_sha256

INSTALLED = vllm_standby.check_vllm_version()


def skip_outside(range_module: ModuleType) -> pytest.MarkDecorator:
    """Skip a test module unless the installed vLLM is in ``range_module.VLLM_RANGE``."""
    return pytest.mark.skipif(
        not range_module.VLLM_RANGE.contains(INSTALLED.base_version, prereleases=True),
        reason=f"vLLM {INSTALLED} is outside {range_module.VLLM_RANGE}",
    )


def _callable(obj, owner):
    # A classmethod replacement is checked as the bound method vLLM calls.
    return obj.__get__(None, owner) if isinstance(obj, classmethod) else obj


def contract_tests(range_module: ModuleType) -> type:
    """A test class over ``range_module.PATCHES``: target exists, signature and source hash pinned, same signature,
    and the apply-time verification accepts the installed vLLM."""

    @pytest.mark.parametrize("spec", range_module.PATCHES, ids=lambda s: s.attribute)
    class TestContract:
        def test_target_exists(self, spec):
            owner, name = spec.resolve()
            assert callable(getattr(owner, name))

        def test_signature(self, spec):
            assert str(inspect.signature(spec.original())) == spec.signature

        def test_source_hash_pinned(self, spec):
            pinned = spec.source_sha256.get(INSTALLED.base_version)
            assert pinned is not None, (
                f"no source hash pinned for vLLM {INSTALLED.base_version}: review {spec.module}.{spec.attribute} "
                f"against the patch, then add {source_sha256(spec.original())!r} to its PatchSpec"
            )
            assert source_sha256(spec.original()) == pinned, (
                f"{spec.module}.{spec.attribute} changed upstream in vLLM {INSTALLED}: review the patch"
            )

        def test_apply_time_verification_accepts_installed_vllm(self, spec):
            spec.verify(spec.original(), INSTALLED)

        def test_replacement_keeps_signature(self, spec):
            owner, _ = spec.resolve()
            replacement = _callable(spec.make_replacement(spec.original()), owner)
            assert inspect.signature(replacement) == inspect.signature(spec.original())

    return TestContract
