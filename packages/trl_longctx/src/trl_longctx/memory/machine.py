"""What the planner knows of machines: GPU memory presets, and the GPU and host memory of the machine it runs on.

Plain Python: torch is imported only by `cuda_gpu`, and only when it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from .shapes import GIB

# GPU presets: the memory torch reports for a card (`torch.cuda.get_device_properties(i).total_memory`), derived from
# the vendor's nominal capacity by one formula, `usable_gib`:
#
#     usable GiB = nominal GiB x (1 - INLINE_ECC_SHARE if the card stores ECC inline) x (1 - DRIVER_RESERVED_SHARE)
#
# - nominal GiB: the vendor's "GB" figure from the card's spec sheet, read as GiB: the memory is built of
#   power-of-two chips, and what the driver exposes comes within 1% of that figure (read as decimal GB it would be
#   7% less than the card has);
# - inline ECC: GDDR data-centre cards (A10, L4, L40S) ship with ECC on and keep its check bits in the memory itself,
#   1/16 of it; HBM cards keep them aside, consumer cards run without ECC;
# - driver reserve: memory the driver keeps for itself (page tables, firmware), which `total_memory` leaves out.
#
# The planner adds the CUDA context and allocator fragmentation on top (`planner.CUDA_CONTEXT_GIB`, `FRAGMENTATION`).
INLINE_ECC_SHARE = 1 / 16
DRIVER_RESERVED_SHARE = 0.01
# name: (nominal GiB, ECC stored inline). The B200 carries 192 GB of memory chips, of which NVIDIA's B200 systems
# specify 180 GB per GPU: what its driver exposes.
GPU_CARDS: dict[str, tuple[float, bool]] = {
    "24GB": (24, False),  # GeForce RTX 3090, RTX 4090 and other 24 GB cards without ECC
    "A10 24GB": (24, True),
    "L4 24GB": (24, True),
    "A100 40GB": (40, False),
    "L40S 48GB": (48, True),
    "A100 80GB": (80, False),
    "H100 80GB": (80, False),
    "H200 141GB": (141, False),
    "B200 180GB": (180, False),
}
# Room the training process needs in host memory beside the pinned checkpoints (the model passes through host memory
# when loaded; Python, the dataset, CUDA's own host allocations): pinned pages cannot be swapped or reclaimed, so
# pinning nearly all of a host's memory fails even when the sum of the buffers would fit.
HOST_RESERVE_GIB = 16.0


def usable_gib(nominal_gib: float, inline_ecc: bool = False) -> float:
    """The GPU memory torch reports for a card of `nominal_gib` (the formula above), GiB to 2 decimals."""
    ecc = 1 - INLINE_ECC_SHARE if inline_ecc else 1.0
    return round(nominal_gib * ecc * (1 - DRIVER_RESERVED_SHARE), 2)


# The one table of preset GPU memories, GiB.
GPUS_GIB: dict[str, float] = {name: usable_gib(*card) for name, card in GPU_CARDS.items()}


def _key(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def gpu_presets_matching(name: str) -> list[str]:
    """The presets `name` names: its exact name (case, spaces and dashes aside, e.g. "h100-80gb"), else every preset
    of the card family it names (its first word, e.g. "H100"; "A100" names two)."""
    exact = [preset for preset in GPUS_GIB if _key(preset) == _key(name)]
    return exact or [preset for preset in GPUS_GIB if _key(preset.split()[0]) == _key(name)]


def cuda_gpu() -> tuple[str, float] | None:
    """`(name, GiB)` of this machine's first CUDA GPU as torch reports them; `None` without torch or CUDA.

    Imports torch (seconds), so callers ask only when the user named no GPU.
    """
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return properties.name, properties.total_memory / GIB


# Where a container's memory limit is written: cgroup v2 (`memory.max`, "max" when unlimited), then cgroup v1.
CGROUP_MEMORY_LIMIT_FILES = ("memory.max", "memory/memory.limit_in_bytes")


def cgroup_memory_limit_bytes(root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's control group (a container's limit), bytes; `None` when none is set or
    readable. v1 writes "no limit" as a huge number (e.g. 2**63 - 4096): the caller takes the smaller of this and the
    physical memory."""
    for name in CGROUP_MEMORY_LIMIT_FILES:
        try:
            text = (Path(root) / name).read_text().strip()
        except OSError:
            continue
        # The first file present decides: a v2 hierarchy has no v1 file, a hybrid one keeps the controller in v1.
        return int(text) if text.isdigit() and int(text) > 0 else None
    return None


def host_memory_gib(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """This machine's memory as this process may use it, GiB: the physical memory (`os.sysconf`), or the control
    group's limit where a container sets a lower one (`cgroup_memory_limit_bytes`); `None` where the operating system
    does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or the name unknown here
        return None
    if pages <= 0 or page_size <= 0:
        return None
    physical = pages * page_size
    limit = cgroup_memory_limit_bytes(cgroup_root)
    return min(physical, limit if limit is not None else physical) / GIB


def pinnable_host_gib(total_gib: float) -> float:
    """Host memory the offloaded checkpoints may pin on a host of `total_gib`: less `HOST_RESERVE_GIB`, at least 0."""
    return max(0.0, total_gib - HOST_RESERVE_GIB)
