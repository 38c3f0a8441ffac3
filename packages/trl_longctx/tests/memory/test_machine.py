"""GPU presets from one formula, the card names they answer to, and this machine's GPU and host memory."""

import types

import pytest

from trl_longctx.memory import machine
from trl_longctx.memory.machine import (
    DRIVER_RESERVED_SHARE,
    GIB,
    GPU_CARDS,
    GPUS_GIB,
    HOST_RESERVE_GIB,
    INLINE_ECC_SHARE,
    cuda_gpu,
    gpu_presets_matching,
    host_memory_gib,
    pinnable_host_gib,
    usable_gib,
)


def test_every_preset_is_the_formula_of_its_nominal_capacity():
    assert list(GPUS_GIB) == list(GPU_CARDS)
    for name, (nominal, inline_ecc) in GPU_CARDS.items():
        assert name.endswith(f"{nominal}GB"), name  # the name says the nominal capacity it is derived from
        ecc = 15 / 16 if inline_ecc else 1
        assert GPUS_GIB[name] == pytest.approx(nominal * ecc * (1 - DRIVER_RESERVED_SHARE), abs=0.005)
        assert GPUS_GIB[name] < nominal
    assert INLINE_ECC_SHARE == 1 / 16
    # The common cards; 80 GiB of HBM gives the 79.2 GiB torch reports on such cards.
    assert {"24GB", "L4 24GB", "A100 40GB", "A100 80GB", "H100 80GB", "H200 141GB", "B200 180GB"} <= set(GPUS_GIB)
    assert GPUS_GIB["H100 80GB"] == GPUS_GIB["A100 80GB"] == 79.2
    assert GPUS_GIB["L4 24GB"] < GPUS_GIB["24GB"] < 24  # ECC stored inline costs 1/16
    assert usable_gib(100) == 99.0 and usable_gib(16, inline_ecc=True) == 14.85


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("H100 80GB", ["H100 80GB"]),
        ("h100-80gb", ["H100 80GB"]),
        ("H100", ["H100 80GB"]),
        ("a10", ["A10 24GB"]),  # not a prefix match: A100 is another family
        ("24gb", ["24GB"]),
        ("A100", ["A100 40GB", "A100 80GB"]),
        ("TPU", []),
        ("80GB", []),
    ],
)
def test_gpu_presets_matching(name, expected):
    assert gpu_presets_matching(name) == expected


def test_host_memory_comes_from_the_operating_system(monkeypatch, tmp_path):
    values = {"SC_PHYS_PAGES": 32 * 2**18, "SC_PAGE_SIZE": 4096}  # 32 GiB in 4 KiB pages
    monkeypatch.setattr(machine.os, "sysconf", values.__getitem__)
    assert host_memory_gib(cgroup_root=tmp_path) == 32.0  # no control-group files: the physical memory
    assert pinnable_host_gib(32.0) == 32.0 - HOST_RESERVE_GIB
    assert pinnable_host_gib(HOST_RESERVE_GIB / 2) == 0.0

    def unknown(name):
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(machine.os, "sysconf", unknown)
    assert host_memory_gib() is None
    monkeypatch.delattr(machine.os, "sysconf")  # Windows
    assert host_memory_gib() is None
    monkeypatch.setattr(machine.os, "sysconf", lambda name: -1, raising=False)
    assert host_memory_gib() is None


@pytest.mark.parametrize(
    ("files", "expected_gib"),
    [
        ({"memory.max": "max"}, 32.0),  # cgroup v2, unlimited
        ({"memory.max": str(20 * 2**30)}, 20.0),  # a container limited to 20 GiB
        ({"memory/memory.limit_in_bytes": str(8 * 2**30)}, 8.0),  # cgroup v1
        ({"memory/memory.limit_in_bytes": str(2**63 - 4096)}, 32.0),  # v1's "no limit"
        (
            {"memory.max": "max", "memory/memory.limit_in_bytes": str(8 * 2**30)},
            32.0,
        ),  # the first file present decides
        ({"memory.max": "garbage"}, 32.0),
    ],
)
def test_host_memory_honours_a_container_limit(monkeypatch, tmp_path, files, expected_gib):
    values = {"SC_PHYS_PAGES": 32 * 2**18, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(machine.os, "sysconf", values.__getitem__)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert host_memory_gib(cgroup_root=tmp_path) == expected_gib


def test_real_host_memory_is_plausible():
    gib = host_memory_gib()
    assert gib is None or 0.5 < gib < 2**16


def test_cuda_gpu_without_torch_or_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(machine.importlib.util, "find_spec", lambda name: None)
    assert cuda_gpu() is None
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_gpu() is None


def test_cuda_gpu_reads_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    properties = types.SimpleNamespace(name="NVIDIA Test", total_memory=int(47.5 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    assert cuda_gpu() == ("NVIDIA Test", 47.5)
