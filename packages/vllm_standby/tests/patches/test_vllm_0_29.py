"""vLLM 0.29-0.30 patches: contracts with upstream (run where vLLM 0.29 or 0.30 is installed)."""

from __future__ import annotations

import inspect

from packaging.version import Version
from patch_contract import INSTALLED, contract_tests, skip_outside

from vllm_standby.patches import vllm_0_29

pytestmark = skip_outside(vllm_0_29)
TestContract = contract_tests(vllm_0_29)


def test_worker_sleep_goes_through_the_backend_factory():
    """0.29 resolves the backend in `_get_sleep_mode_backend()`, 0.30 in the lazily set `sleep_mode_backend`
    property; both through the patched factory, on first sleep, after the plugins ran."""
    from vllm.v1.worker import gpu_worker

    if Version(INSTALLED.base_version) >= Version("0.30"):
        resolver, call = gpu_worker.Worker.sleep_mode_backend.fget, "self.sleep_mode_backend."
    else:
        resolver, call = gpu_worker.Worker._get_sleep_mode_backend, "_get_sleep_mode_backend()"
    assert "SleepModeBackendFactory.create_backend" in inspect.getsource(resolver)
    for method in (gpu_worker.Worker.sleep, gpu_worker.Worker.wake_up):
        assert call in inspect.getsource(method)
