"""The chunk planner with the CUDA backend's thresholds.

The planner and the plan runner themselves live in ``kvbroker.memory.chunks``, shared with
the host backend, whose fault-injection tests therefore cover the CUDA recovery logic.
What is CUDA-specific is the trade-off:

* ``DIRECT_CHUNK_MIN_BYTES``: an overlapping slide by at least 2 MiB copies directly, in
  chunks of the slide distance. Smaller chunks would make many tiny device copies; staging
  costs a second pass over the bytes, cheap at device bandwidth.
* ``STAGING_BYTES``: the staging buffer is at most 64 MiB of device memory, allocated for
  the duration of one ``copy`` and returned (with ``empty_cache``) before it returns, so it
  never stays cached where a later segment's ``cudaMalloc`` block could be carved from it.
"""

from __future__ import annotations

from kvbroker.core.types import MiB
from kvbroker.memory import chunks as _shared
from kvbroker.memory.chunks import Chunk

DIRECT_CHUNK_MIN_BYTES = 2 * MiB
STAGING_BYTES = 64 * MiB


def plan_chunks(
    src_offset: int,
    dst_offset: int,
    nbytes: int,
    *,
    same_segment: bool,
    direct_min: int = DIRECT_CHUNK_MIN_BYTES,
    staging: int = STAGING_BYTES,
) -> list[Chunk]:
    """``kvbroker.memory.chunks.plan_chunks`` with the CUDA thresholds as defaults."""
    return _shared.plan_chunks(
        src_offset, dst_offset, nbytes, same_segment=same_segment, direct_min=direct_min, staging=staging
    )
