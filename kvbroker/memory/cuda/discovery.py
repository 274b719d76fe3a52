"""The GPUs this process sees, named by UUID.

A device index means something only inside one process: ``CUDA_VISIBLE_DEVICES``
renumbers devices per process, so the broker and a client may call one GPU by two
indices. The UUID is the same everywhere, so it is the device id on the wire; the index is
looked up locally. torch is imported inside the functions, so importing this module does
not load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One visible GPU. ``uuid`` is its stable name; ``index`` is valid in this process only."""

    uuid: str
    index: int
    name: str
    total_bytes: int


def gpu_uuid(torch: Any, index: int) -> str:
    """The UUID of GPU ``index`` as the wire carries it: ``GPU-xxxxxxxx-...``
    (``MIG-...`` for a MIG instance, which is a device of its own)."""
    text = str(torch.cuda.get_device_properties(index).uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def discover_gpus() -> list[GpuInfo]:
    """Every GPU this process sees, by UUID; empty without torch or CUDA.

    Cost: imports torch and initializes CUDA on first call (hundreds of milliseconds), so
    the caller configures the allocator (``configure_cuda_allocator_env``) first.
    """
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(gpu_uuid(torch, index), index, props.name, props.total_memory))
    return gpus
