"""The vLLM plugin entry point: resolves, is re-entrant, reads the opt-in switch, and says how to fix it.

What the entry point does in a fresh process (inert without opt-in, live with it, enable/disable) is tested in
subprocesses in `test_opt_in.py`; here the in-process parts.
"""

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


def test_load_general_plugins_after_enable_leaves_patches_live():
    _entry_point()
    from vllm.plugins import load_general_plugins

    vllm_standby.enable()
    load_general_plugins()
    assert vllm_standby.is_active()
    for patch in vllm_standby.applied_patches():
        # Static lookup: a patched classmethod is stored as the descriptor, `getattr` would give a bound method.
        assert inspect.getattr_static(patch.target, patch.name) is patch.replacement
        # The marker is on the function; a classmethod replacement wraps it (`__func__`).
        assert getattr(getattr(patch.replacement, "__func__", patch.replacement), "__vllm_standby__", False)


def test_second_register_and_enable_are_noops(monkeypatch):
    vllm_standby.enable()
    first = vllm_standby.applied_patches()
    monkeypatch.setenv("VLLM_STANDBY", "1")
    vllm_standby.register()
    vllm_standby.enable()
    assert vllm_standby.applied_patches() == first
    assert all(p.is_live() for p in first)
    assert vllm_standby.is_active() and vllm_standby.is_enabled()


def test_cpu_platform_gets_the_cpu_patch():
    from vllm.platforms import current_platform

    vllm_standby.enable()
    names = {p.qualname for p in vllm_standby.applied_patches()}
    expected = "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm"
    assert (expected in names) == current_platform.is_cpu()


def test_is_active_error_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(plugin, "_STATE", plugin._State())
    assert vllm_standby.is_active(strict=False) is False
    with pytest.raises(vllm_standby.StandbyNotActiveError) as info:
        vllm_standby.is_active()
    message = str(info.value)
    for hint in ("VLLM_PLUGINS", "vllm.general_plugins", "enable()", "VLLM_STANDBY=1"):
        assert hint in message


@pytest.mark.parametrize("value", [None, "0", " 0 ", ""])
def test_register_without_opt_in_is_inert(monkeypatch, value):
    monkeypatch.setattr(plugin, "_STATE", plugin._State())
    if value is None:
        monkeypatch.delenv("VLLM_STANDBY", raising=False)
    else:
        monkeypatch.setenv("VLLM_STANDBY", value)
    # Must not apply anything: the session's patches are live, so applying again would raise "already patched".
    plugin.register()
    assert not vllm_standby.is_active(strict=False) and not vllm_standby.is_enabled()
    with pytest.raises(vllm_standby.StandbyNotActiveError, match="did not opt in"):
        vllm_standby.is_active()


def test_register_with_opt_in_applies(monkeypatch):
    state = plugin._State()
    monkeypatch.setattr(plugin, "_STATE", state)
    monkeypatch.setenv("VLLM_STANDBY", "1")
    applied = []
    # The session's patches are live already; record the call instead of applying them twice.
    monkeypatch.setattr(plugin, "_apply_range_patches", lambda version: applied.append(version))
    plugin.register()
    assert applied == [vllm_standby.check_vllm_version()]


@pytest.mark.parametrize("value", ["true", "yes", "2"])
def test_register_refuses_a_bad_switch_value(monkeypatch, value):
    monkeypatch.setattr(plugin, "_STATE", plugin._State())
    monkeypatch.setenv("VLLM_STANDBY", value)
    with pytest.raises(ValueError, match=f"VLLM_STANDBY='{value}' is not allowed") as info:
        plugin.register()
    assert "VLLM_STANDBY=1" in str(info.value)


def test_opt_in_child_processes_restores_the_environment(monkeypatch):
    import os

    monkeypatch.delenv("VLLM_STANDBY", raising=False)
    with vllm_standby.opt_in_child_processes():
        assert os.environ["VLLM_STANDBY"] == "1"
    assert "VLLM_STANDBY" not in os.environ
    monkeypatch.setenv("VLLM_STANDBY", "0")
    with pytest.raises(KeyError), vllm_standby.opt_in_child_processes():
        raise KeyError("an engine that failed to start")
    assert os.environ["VLLM_STANDBY"] == "0"
