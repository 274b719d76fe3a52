"""One cache file on a real filesystem: written from a page-aligned buffer (direct I/O
where the filesystem allows it) or an ordinary one, read straight into a buffer or
through a sink; every path gives the same bytes, a file any safetensors reader reads,
and any damaged chunk rejected. A file of the first format (safetensors' own writer,
blake2b digests) still loads."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kvbroker.persistence.cachefile import CHUNK_BYTES, CacheMeta, CorruptFile, read_cache_file, write_cache_file
from kvbroker.persistence.directio import ALIGN, aligned_buffer

#: Two chunks and an unaligned tail: the direct path, its fallback for the tail, and a
#: second chunk's digest all run.
SIZES = (CHUNK_BYTES + 3 * ALIGN + 5, 2 * CHUNK_BYTES, 1)


def meta_of(nbytes: int) -> CacheMeta:
    return CacheMeta("cache-1", "kept", "model", "uint8", (nbytes,), True, 2, nbytes)


def data_of(nbytes: int, aligned: bool) -> np.ndarray:
    data = aligned_buffer(nbytes) if aligned else np.empty(nbytes, dtype=np.uint8)
    data[:] = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    return data


def read_both_ways(path: str, size: int, digest: str, nbytes: int) -> tuple[CacheMeta, bytes, CacheMeta, bytes]:
    into = aligned_buffer(nbytes)
    meta_into = read_cache_file(path, size, digest, into)
    got = bytearray(nbytes)

    def sink(offset: int, chunk: np.ndarray) -> None:
        got[offset : offset + chunk.nbytes] = chunk.tobytes()

    meta_sink = read_cache_file(path, size, digest, sink)
    return meta_into, into.tobytes(), meta_sink, bytes(got)


@pytest.mark.parametrize("aligned", [True, False], ids=["page-aligned", "unaligned"])
@pytest.mark.parametrize("nbytes", SIZES)
def test_every_path_round_trips_and_safetensors_reads_the_file(tmp_path, nbytes, aligned):
    data = data_of(nbytes, aligned)
    path = str(tmp_path / "c.safetensors")
    size, digest = write_cache_file(path, meta_of(nbytes), data)
    assert size == os.path.getsize(path)
    assert digest.startswith("crc32c:")
    (header_len,) = struct.unpack("<Q", open(path, "rb").read(8))
    assert (8 + header_len) % ALIGN == 0, "the data starts on an alignment boundary"
    assert np.array_equal(load_file(path)["bytes"], data)
    meta_into, into, meta_sink, sunk = read_both_ways(path, size, digest, nbytes)
    assert meta_into == meta_sink == meta_of(nbytes)
    assert into == sunk == data.tobytes()


@pytest.mark.parametrize("where", ["header", "first chunk", "last byte"])
def test_a_flipped_byte_anywhere_is_rejected_both_ways(tmp_path, where):
    nbytes = SIZES[0]
    path = str(tmp_path / "c.safetensors")
    size, digest = write_cache_file(path, meta_of(nbytes), data_of(nbytes, True))
    (header_len,) = struct.unpack("<Q", open(path, "rb").read(8))
    # In the header: a padding space turned into a tab still parses as JSON, so only the
    # digest can tell.
    offset = {"header": 8 + header_len - 1, "first chunk": 8 + header_len + 12345, "last byte": size - 1}[where]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([0x09 if where == "header" else byte ^ 0x01]))
    with pytest.raises(CorruptFile, match="digest differs"):
        read_cache_file(path, size, digest, aligned_buffer(nbytes))
    with pytest.raises(CorruptFile, match="digest differs"):
        read_cache_file(path, size, digest, lambda offset, chunk: None)


def test_a_truncated_file_and_an_unknown_digest_are_rejected(tmp_path):
    nbytes = SIZES[0]
    path = str(tmp_path / "c.safetensors")
    size, digest = write_cache_file(path, meta_of(nbytes), data_of(nbytes, True))
    with pytest.raises(CorruptFile, match="not one this version checks"):
        read_cache_file(path, size, "md5:00:00", aligned_buffer(nbytes))
    os.truncate(path, size - ALIGN)
    with pytest.raises(CorruptFile, match="the manifest says"):
        read_cache_file(path, size, digest, aligned_buffer(nbytes))


def test_a_first_format_file_with_blake2b_digests_still_loads(tmp_path):
    """safetensors' own writer (data at an unaligned offset: direct I/O falls back) and
    the first format's two-part blake2b digest."""
    nbytes = SIZES[0]
    data = data_of(nbytes, False)
    path = str(tmp_path / "old.safetensors")
    save_file({"bytes": data}, path, metadata=meta_of(nbytes).to_strings())
    raw = open(path, "rb").read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    head = hashlib.blake2b(raw[: 8 + header_len], digest_size=32).hexdigest()
    top = hashlib.blake2b(digest_size=32)
    for start in range(0, nbytes, CHUNK_BYTES):
        top.update(hashlib.blake2b(data[start : start + CHUNK_BYTES], digest_size=32).digest())
    digest = f"{head}:{top.hexdigest()}"
    meta_into, into, meta_sink, sunk = read_both_ways(path, len(raw), digest, nbytes)
    assert meta_into == meta_sink == meta_of(nbytes)
    assert into == sunk == data.tobytes()
    with pytest.raises(CorruptFile, match="blake2b digest differs"):
        read_cache_file(path, len(raw), f"{head}:{'0' * 64}", aligned_buffer(nbytes))


def test_a_file_of_the_crc32_format_is_still_checked(tmp_path, monkeypatch):
    """Files written before CRC-32C became the default carry zlib CRC-32 digests
    (``crc32:...``): they are read and checked as before, and damage is still caught."""
    from kvbroker.persistence import cachefile

    nbytes = SIZES[-1]
    data = data_of(nbytes, True)
    path = str(tmp_path / "crc32.safetensors")
    monkeypatch.setattr(cachefile, "DEFAULT_ALGORITHM", "crc32")
    size, digest = write_cache_file(path, meta_of(nbytes), data)
    monkeypatch.undo()
    assert digest.startswith("crc32:")
    meta_into, into, meta_sink, sunk = read_both_ways(path, size, digest, nbytes)
    assert meta_into == meta_sink == meta_of(nbytes) and into == sunk == data.tobytes()
    with open(path, "r+b") as f:
        f.seek(size - 1)
        last = f.read(1)
        f.seek(size - 1)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CorruptFile, match="crc32 digest differs"):
        read_cache_file(path, size, digest, aligned_buffer(nbytes))
