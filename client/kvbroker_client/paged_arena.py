"""A paged pool's arena as this process maps it: the mapping, the per-layer tensors over
it, and populating its pages (``PagedPool.warmup``).

The arena is one host segment or CUDA allocation holding every layer back to back
(``KvLayout.layer_bytes``); ``layer_views`` are views of it, so a write through them is
a write into the broker's memory, no copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbroker.kvlayout import KvLayout
from kvbroker.v1 import broker_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = ["layer_views", "map_arena", "populate"]

_PAGE = 4096


def populate(arena: torch.Tensor) -> None:
    """Map every page of a host arena into this process (``MADV_POPULATE_WRITE``, the
    bytes untouched; a read of one byte per page where the kernel lacks it); a no-op on
    a CUDA arena (device memory is resident)."""
    if arena.device.type == "cpu" and not _populate_write(arena.data_ptr(), arena.numel()):
        int(arena[::_PAGE].sum())


_MADV_POPULATE_WRITE = 23


def _populate_write(address: int, nbytes: int) -> bool:
    """Fault ``[address, address + nbytes)`` in writable without writing; False when the
    kernel cannot (older than 5.14) or this is not Linux."""
    import ctypes
    import ctypes.util

    start = address - address % _PAGE
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), _MADV_POPULATE_WRITE) == 0
    except (OSError, AttributeError):
        return False


def map_arena(handle: pb.Handle) -> torch.Tensor:
    """The arena's bytes as one uint8 tensor over this process's mapping of it."""
    from kvbroker_client.mapping import process_mapper

    return process_mapper().view(handle)


def layer_views(arena: torch.Tensor, layout: KvLayout, num_blocks: int) -> list[torch.Tensor]:
    """Each layer's ``(2, num_blocks, block_tokens, num_kv_heads, head_dim)`` view."""
    from kvbroker_client.dtypes import to_torch_dtype

    dtype = to_torch_dtype(layout.dtype)
    size, shape = layout.layer_bytes(num_blocks), layout.layer_shape(num_blocks)
    return [arena[i * size : (i + 1) * size].view(dtype).view(shape) for i in range(layout.num_layers)]
