"""The host backend's ``read_into``/``write_from`` (``ByteAccess``), which checkpoints and
restores copy through: a real shm segment, its bytes round-trip (into a segment that was
not prefaulted too, as a restore's is); a range outside the segment or an unknown segment
is refused before any byte moves."""

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


def test_a_restore_fills_a_segment_that_was_not_prefaulted(memory, tmp_path):
    """A restore's segment is created without prefault and written through its file
    (``write_from``): the file's bytes land at the offset, what no write covered still
    reads as zeros (a neighbour placed there later needs no zeroing), and a client's own
    mapping of the object sees the same bytes."""
    import mmap
    import os

    from kvbroker.persistence.cachefile import PIECE_BYTES, CacheMeta, read_cache_file, write_cache_file
    from kvbroker.persistence.directio import aligned_buffer

    size = 3 * PIECE_BYTES + 4096  # several pieces and a partial one
    memory.create(SegmentInfo(2, 1, "p", "host", 8 * PIECE_BYTES), prefault=False)
    data = aligned_buffer(size)
    data[:] = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
    meta = CacheMeta("c", "p", "m", "uint8", (size,), False, 0, size)
    nbytes, digest = write_cache_file(str(tmp_path / "c.safetensors"), meta, data)
    base = PIECE_BYTES + 8192

    def sink(offset: int, piece: np.ndarray) -> None:
        memory.write_from(2, base + offset, piece)

    assert read_cache_file(str(tmp_path / "c.safetensors"), nbytes, digest, sink) == meta
    whole = np.empty(8 * PIECE_BYTES, dtype=np.uint8)
    memory.read_into(2, 0, whole)
    assert np.array_equal(whole[base : base + size], data)
    assert not whole[:base].any() and not whole[base + size :].any()
    handle = memory.handle(2)
    fd = os.open(os.path.join(handle.shm_dir, handle.shm_name), os.O_RDONLY)
    try:
        with mmap.mmap(fd, 8 * PIECE_BYTES, prot=mmap.PROT_READ) as client:
            assert client[base : base + size] == data.tobytes()
    finally:
        os.close(fd)


def test_a_file_read_into_a_buffer_lands_whole(tmp_path):
    """The other destination of ``read_cache_file``: a buffer of the cache's size, which
    several readers fill at once (a file of several chunks); a buffer of another size is
    refused before any read."""
    from kvbroker.persistence.cachefile import CHUNK_BYTES, CacheMeta, read_cache_file, write_cache_file
    from kvbroker.persistence.directio import aligned_buffer

    size = 2 * CHUNK_BYTES + 12345
    data = aligned_buffer(size)
    data[:] = np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8)
    meta = CacheMeta("c", "p", "m", "uint8", (size,), False, 0, size)
    nbytes, digest = write_cache_file(str(tmp_path / "c.safetensors"), meta, data)
    out = np.zeros(size, dtype=np.uint8)
    assert read_cache_file(str(tmp_path / "c.safetensors"), nbytes, digest, out) == meta
    assert np.array_equal(out, data)
    with pytest.raises(ValueError, match="destination holds"):
        read_cache_file(str(tmp_path / "c.safetensors"), nbytes, digest, np.zeros(size - 1, dtype=np.uint8))
