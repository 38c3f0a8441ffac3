"""The vLLM plugin entry point: resolves, is re-entrant, and leaves the attributes ours."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

import vllm_standby
from vllm_standby import plugin


def _entry_point():
    matches = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "vllm_standby"]
    if not matches:
        pytest.skip("vllm-standby is not pip-installed here (PYTHONPATH only): no entry point to resolve")
    return matches[0]


def test_entry_point_resolves_to_register():
    assert _entry_point().load() is plugin.register


def test_load_general_plugins_leaves_patches_live():
    _entry_point()
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    assert vllm_standby.is_active()
    for patch in vllm_standby.applied_patches():
        # Static lookup: a patched classmethod is stored as the descriptor, `getattr` would give a bound method.
        assert inspect.getattr_static(patch.target, patch.name) is patch.replacement
        # The marker is on the function; a classmethod replacement wraps it (`__func__`).
        assert getattr(getattr(patch.replacement, "__func__", patch.replacement), "__vllm_standby__", False)


def test_second_register_is_a_noop():
    vllm_standby.register()
    first = vllm_standby.applied_patches()
    vllm_standby.register()
    vllm_standby.enable()
    assert vllm_standby.applied_patches() == first
    assert all(p.is_live() for p in first)
    assert vllm_standby.is_active()


def test_cpu_platform_gets_the_cpu_patch():
    from vllm.platforms import current_platform

    vllm_standby.register()
    names = {p.qualname for p in vllm_standby.applied_patches()}
    expected = "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm"
    assert (expected in names) == current_platform.is_cpu()


def test_is_active_error_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(plugin, "_STATE", plugin._State())
    assert vllm_standby.is_active(strict=False) is False
    with pytest.raises(vllm_standby.StandbyNotActiveError) as info:
        vllm_standby.is_active()
    message = str(info.value)
    assert "VLLM_PLUGINS" in message and "vllm.general_plugins" in message and "enable()" in message


def test_env_switch_zero_keeps_register_inert(monkeypatch):
    monkeypatch.setattr(plugin, "_STATE", plugin._State())
    monkeypatch.setenv("VLLM_STANDBY", "0")
    plugin.register()
    assert not vllm_standby.is_active(strict=False)
    with pytest.raises(vllm_standby.StandbyNotActiveError, match="VLLM_STANDBY=0"):
        vllm_standby.is_active()


def test_env_switch_one_enables_standby(monkeypatch):
    state = plugin._State()
    monkeypatch.setattr(plugin, "_STATE", state)
    monkeypatch.setenv("VLLM_STANDBY", "1")
    # Patches are live from the session's register(); mimic that part to test only the switch.
    monkeypatch.setattr(plugin, "_apply_range_patches", lambda version: setattr(state, "registered", True))
    plugin.register()
    assert vllm_standby.is_enabled()
