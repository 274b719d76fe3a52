"""The host backend's ``read_into``/``write_from`` (``ByteAccess``), which checkpoints and
restores copy through: a real shm segment, its bytes round-trip; a range outside the
segment or an unknown segment is refused before any byte moves."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest

from kvbroker.core.types import SegmentInfo
from kvbroker.memory.host import HostMemory

N = 1 << 20


@pytest.fixture()
def memory():
    shm = tempfile.mkdtemp(prefix="kvb-bytes-", dir="/dev/shm")  # the tmpfs segments live on
    try:
        with HostMemory("bytes-test", shm_dir=shm) as mem:
            mem.create(SegmentInfo(1, 1, "p", "host", N))
            yield mem
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_bytes_round_trip_at_an_offset(memory):
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    memory.write_from(1, 8192, data)
    out = np.zeros(4096 + 2, dtype=np.uint8)
    memory.read_into(1, 8192 - 1, out)
    assert out[0] == 0 and out[-1] == 0 and bytes(out[1:-1]) == data.tobytes()


def test_out_of_range_and_unknown_segments_are_refused(memory):
    with pytest.raises(ValueError, match="outside segment 1"):
        memory.write_from(1, N - 10, np.ones(11, dtype=np.uint8))
    with pytest.raises(ValueError, match="outside segment 1"):
        memory.read_into(1, N, np.empty(1, dtype=np.uint8))
    with pytest.raises(KeyError):
        memory.read_into(2, 0, np.empty(1, dtype=np.uint8))
    out = np.empty(N, dtype=np.uint8)
    memory.read_into(1, 0, out)
    assert not out.any(), "nothing was written by the refused calls"


def test_a_mapped_range_is_the_segments_bytes_and_is_checked(memory, tmp_path):
    """``mapped`` (a restore reads files straight into it): bytes written through the
    view are the segment's, a file read into it with read_cache_file lands at the
    offset, and a bad range or segment is refused."""
    from kvbroker.persistence.cachefile import CacheMeta, read_cache_file, write_cache_file
    from kvbroker.persistence.directio import aligned_buffer

    with memory.mapped(1, 4096, 3) as view:
        view[:] = b"abc"
    out = np.empty(5, dtype=np.uint8)
    memory.read_into(1, 4095, out)
    assert bytes(out) == b"\0abc\0"
    data = aligned_buffer(65536)
    data[:] = np.random.default_rng(3).integers(0, 256, 65536, dtype=np.uint8)
    meta = CacheMeta("c", "p", "m", "uint8", (65536,), False, 0, 65536)
    size, digest = write_cache_file(str(tmp_path / "c.safetensors"), meta, data)
    with memory.mapped(1, 8192, 65536) as view:
        assert read_cache_file(str(tmp_path / "c.safetensors"), size, digest, view) == meta
    back = np.empty(65536, dtype=np.uint8)
    memory.read_into(1, 8192, back)
    assert np.array_equal(back, data)
    with pytest.raises(ValueError, match="outside segment 1"):
        with memory.mapped(1, N - 10, 11):
            pass
    with pytest.raises(KeyError):
        with memory.mapped(2, 0, 1):
            pass
