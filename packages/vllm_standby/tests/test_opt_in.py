"""Opt-in only: with the package installed, a process that did not opt in gets vLLM exactly as shipped.

Each check runs in a fresh Python process with the real vLLM build, because vLLM loads its plugins once per process
(and this session's process opted in for its engine). The child prints one JSON line, which the test reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import USER_VLLM_STANDBY

import vllm_standby

# What every child starts with: the installed vLLM's patch specs that apply on this platform, and their targets as
# they are now (static lookup: a classmethod stays its descriptor).
PRELUDE = """
import dataclasses, inspect, json, os
from vllm.platforms import current_platform
from vllm_standby import patches
from vllm_standby._version import installed_vllm_version
from vllm_standby.patching import PatchError

SPECS = [s for s in patches.module_for(installed_vllm_version()).PATCHES
         if s.platform is None or s.platform == current_platform.device_type]

def targets():
    return [inspect.getattr_static(*s.resolve()) for s in SPECS]

ORIGINALS = targets()

def unchanged():
    return all(now is was for now, was in zip(targets(), ORIGINALS, strict=True))
"""


def _entry_point_installed() -> bool:
    import importlib.metadata

    return any(ep.name == "vllm_standby" for ep in importlib.metadata.entry_points(group="vllm.general_plugins"))


pytestmark = pytest.mark.skipif(not _entry_point_installed(), reason="vllm-standby is not pip-installed here")


def _child(body: str, env: dict[str, str | None], timeout: float = 300) -> dict:
    """Run PRELUDE + `body` in a fresh interpreter with `env` applied (None removes a variable); its JSON line."""
    child_env = {k: v for k, v in os.environ.items() if k != "VLLM_STANDBY"}
    for key, value in env.items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    code = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"child printed no JSON line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1])


LOAD_PLUGINS = """
from vllm.plugins import load_general_plugins
load_general_plugins()
import vllm_standby
from vllm_standby import plugin
print(json.dumps({
    "specs": len(SPECS), "unchanged": unchanged(), "applied": len(vllm_standby.applied_patches()),
    "live": all(inspect.getattr_static(p.target, p.name) is p.replacement for p in vllm_standby.applied_patches()),
    "active": vllm_standby.is_active(strict=False), "env": os.environ.get("VLLM_STANDBY"),
    "inert_reason": plugin._STATE.inert_reason,
}))
"""


@pytest.mark.parametrize("switch", [None, "0"])
def test_load_general_plugins_without_opt_in_patches_nothing(switch):
    result = _child(LOAD_PLUGINS, {"VLLM_STANDBY": switch, "VLLM_PLUGINS": None})
    assert result["specs"] > 0
    assert result["inert_reason"] and "did not opt in" in result["inert_reason"], "the entry point did not run"
    assert result["unchanged"] and result["applied"] == 0 and not result["active"]
    assert result["env"] == switch


def test_load_general_plugins_with_opt_in_patches_everything():
    result = _child(LOAD_PLUGINS, {"VLLM_STANDBY": "1", "VLLM_PLUGINS": None})
    assert result["applied"] == result["specs"] > 0
    assert result["live"] and not result["unchanged"] and result["active"]


def test_vllm_plugins_empty_loads_no_plugin_even_opted_in():
    """`VLLM_PLUGINS=""` (no plugin allowed) is what the benchmark uses for "package not installed"."""
    result = _child(LOAD_PLUGINS, {"VLLM_STANDBY": "1", "VLLM_PLUGINS": ""})
    assert result["inert_reason"] is None, "register() ran although VLLM_PLUGINS allows no plugin"
    assert result["unchanged"] and result["applied"] == 0


def test_enable_disable_enable_restores_every_original():
    result = _child(
        """
        import vllm_standby
        vllm_standby.enable()
        enabled = {"applied": len(vllm_standby.applied_patches()), "changed": not unchanged()}
        vllm_standby.disable()
        disabled = {"applied": len(vllm_standby.applied_patches()), "unchanged": unchanged(),
                    "active": vllm_standby.is_active(strict=False)}
        vllm_standby.enable()
        again = {"applied": len(vllm_standby.applied_patches()), "active": vllm_standby.is_active(strict=False)}
        vllm_standby.disable()
        print(json.dumps({"specs": len(SPECS), "enabled": enabled, "disabled": disabled, "again": again,
                          "final_unchanged": unchanged(), "env": "VLLM_STANDBY" in os.environ}))
        """,
        {"VLLM_STANDBY": None},
    )
    assert result["enabled"] == {"applied": result["specs"], "changed": True}
    assert result["disabled"] == {"applied": 0, "unchanged": True, "active": False}
    assert result["again"] == {"applied": result["specs"], "active": True}
    assert result["final_unchanged"] and not result["env"]


def test_enable_wins_over_vllm_standby_zero():
    result = _child(
        """
        import vllm_standby
        vllm_standby.enable()
        print(json.dumps({"active": vllm_standby.is_active(strict=False), "env": os.environ.get("VLLM_STANDBY")}))
        """,
        {"VLLM_STANDBY": "0"},
    )
    assert result == {"active": True, "env": "0"}


def test_doctored_real_spec_is_refused_and_leaves_vllm_untouched():
    result = _child(
        """
        from vllm_standby._version import installed_vllm_version
        refused = []
        for spec in SPECS:
            for doctored in (dataclasses.replace(spec, source_sha256={}),
                             dataclasses.replace(spec, source_sha256={k: "0" * 64 for k in spec.source_sha256}),
                             dataclasses.replace(spec, signature="(self)")):
                try:
                    doctored.apply()
                except PatchError as exc:
                    refused.append(spec.target in str(exc) and str(installed_vllm_version()) in str(exc))
                else:
                    refused.append(False)
        print(json.dumps({"refused": refused, "unchanged": unchanged()}))
        """,
        {"VLLM_STANDBY": None},
    )
    assert result["refused"] and all(result["refused"]) and result["unchanged"]


def test_session_engine_left_no_switch_in_the_environment(vllm_llm):
    """The session's StandbyLLM was built in this process; only a value the user had set may remain."""
    assert os.environ.get("VLLM_STANDBY") == USER_VLLM_STANDBY
    assert vllm_standby.is_active()


@pytest.mark.slow
def test_standby_llm_engine_processes_opt_in_and_the_switch_is_scoped(tiny_qwen3_dir):
    """Multiprocessing mode: the engine core process opts in through VLLM_STANDBY=1, set only around LLM.__init__;
    the user's own value (here 0, which an explicit opt-in overrides) is back afterwards."""
    result = _child(
        f"""
        import vllm_standby

        def engine_side(worker):
            import os, vllm_standby
            return [os.getpid(), os.environ.get("VLLM_STANDBY"), vllm_standby.is_active(strict=False),
                    len(vllm_standby.applied_patches())]

        llm = vllm_standby.StandbyLLM({str(tiny_qwen3_dir)!r}, dtype="float32", enforce_eager=True, max_model_len=128,
                                      max_num_seqs=2, kv_cache_memory_bytes=16 * 2**20, seed=0)
        pid, env, active, applied = llm.collective_rpc(engine_side)[0]
        from vllm import SamplingParams
        out = llm.generate([{{"prompt_token_ids": [5, 17, 9]}}], SamplingParams(max_tokens=2, temperature=0.0),
                           use_tqdm=False)
        print(json.dumps({{"engine_pid_is_other": pid != os.getpid(), "engine_env": env, "engine_active": active,
                          "engine_applied": applied, "specs": len(SPECS), "env_after": os.environ.get("VLLM_STANDBY"),
                          "tokens": len(out[0].outputs[0].token_ids), "released": llm.standby() > 0}}))
        """,
        # Functions as collective_rpc methods cross to the engine process pickled, which vLLM allows only with this.
        {"VLLM_STANDBY": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
        timeout=600,
    )
    assert result["engine_pid_is_other"], "the engine did not run in its own process"
    assert result["engine_env"] == "1" and result["engine_active"] and result["engine_applied"] == result["specs"]
    assert result["env_after"] == "0"
    assert result["tokens"] == 2 and result["released"]
