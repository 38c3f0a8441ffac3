"""vLLM 0.25-0.28 patches: contracts with upstream (run where vLLM 0.25 is installed: the GPU image)."""

from __future__ import annotations

import inspect

import pytest

import vllm_standby
from vllm_standby.patches import vllm_0_25
from vllm_standby.patching import source_sha256

INSTALLED = vllm_standby.check_vllm_version()
pytestmark = pytest.mark.skipif(
    not vllm_0_25.VLLM_RANGE.contains(INSTALLED.base_version, prereleases=True),
    reason=f"vLLM {INSTALLED} is outside {vllm_0_25.VLLM_RANGE}",
)


def _callable(obj, owner):
    # A classmethod replacement is checked as the bound method vLLM calls.
    return obj.__get__(None, owner) if isinstance(obj, classmethod) else obj


@pytest.mark.parametrize("spec", vllm_0_25.PATCHES, ids=lambda s: s.attribute)
class TestContract:
    """Fails loudly when the upstream internals a patch touches move."""

    def test_target_exists(self, spec):
        owner, name = spec.resolve()
        assert callable(getattr(owner, name))

    def test_signature(self, spec):
        assert str(inspect.signature(spec.original())) == spec.signature

    def test_source_hash_pinned(self, spec):
        pinned = spec.source_sha256.get(INSTALLED.base_version)
        assert pinned is not None, (
            f"no source hash pinned for vLLM {INSTALLED.base_version}: review {spec.module}.{spec.attribute} against "
            f"the patch, then add {source_sha256(spec.original())!r} to its PatchSpec"
        )
        assert source_sha256(spec.original()) == pinned, (
            f"{spec.module}.{spec.attribute} changed upstream in vLLM {INSTALLED}: review the patch"
        )

    def test_replacement_keeps_signature(self, spec):
        owner, _ = spec.resolve()
        replacement = _callable(spec.make_replacement(spec.original()), owner)
        assert inspect.signature(replacement) == inspect.signature(spec.original())


def test_worker_sleep_goes_through_the_backend_factory():
    """Patch 2 works because the GPU worker resolves its sleep-mode backend through the factory, lazily."""
    from vllm.v1.worker import gpu_worker

    source = inspect.getsource(gpu_worker.Worker._get_sleep_mode_backend)
    assert "SleepModeBackendFactory.create_backend" in source
    for method in (gpu_worker.Worker.sleep, gpu_worker.Worker.wake_up):
        assert "_get_sleep_mode_backend()" in inspect.getsource(method)


def test_cumem_allocation_records_have_what_the_backend_uses():
    from vllm.device_allocator import AllocationData
    from vllm.device_allocator.cumem import create_and_map, unmap_and_release

    fields = {f.name for f in AllocationData.__dataclass_fields__.values()}
    assert {"handle", "tag", "is_asleep"} <= fields
    assert callable(create_and_map) and callable(unmap_and_release)


def test_backend_chosen_only_when_enabled(monkeypatch):
    from vllm.device_allocator.sleep_mode_backend import CuMemBackend, SleepModeBackendFactory

    from vllm_standby import plugin
    from vllm_standby.kv_sleep_backend import KVOnlySleepBackend

    if not vllm_standby.is_active(strict=False):
        vllm_standby.register()
    config = type("ModelConfig", (), {"sleep_mode_backend": "cumem"})()
    monkeypatch.setattr(plugin._STATE, "enabled", True)
    assert isinstance(SleepModeBackendFactory.create_backend(config), KVOnlySleepBackend)
    monkeypatch.setattr(plugin._STATE, "enabled", False)
    assert type(SleepModeBackendFactory.create_backend(config)) is CuMemBackend
