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
