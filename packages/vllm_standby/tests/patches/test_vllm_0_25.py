"""vLLM 0.25-0.28 patches: contracts with upstream (run where vLLM 0.25 is installed: the GPU image)."""

from __future__ import annotations

import inspect

from patch_contract import contract_tests, skip_outside

import vllm_standby
from vllm_standby.patches import vllm_0_25

pytestmark = skip_outside(vllm_0_25)
TestContract = contract_tests(vllm_0_25)


def test_worker_sleep_goes_through_the_backend_factory():
    """The sleep-backend patch works because the GPU worker resolves its sleep-mode backend through the factory."""
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
        vllm_standby.enable()
    config = type("ModelConfig", (), {"sleep_mode_backend": "cumem"})()
    assert isinstance(SleepModeBackendFactory.create_backend(config), KVOnlySleepBackend)
    monkeypatch.setattr(plugin._STATE, "applied", False)  # as the replacement sees a process that did not opt in
    assert type(SleepModeBackendFactory.create_backend(config)) is CuMemBackend


def test_mechanism_is_the_sleep_backend_patch_on_cuda():
    from vllm.platforms import current_platform

    expected = "sleep-backend-patch" if current_platform.is_cuda() else "cpu-worker"
    assert vllm_standby.kv_standby_mechanism() == expected
