"""One cache as one safetensors file, bound to its cache by id.

The file holds the cache's bytes as one 1-D ``uint8`` tensor named ``bytes`` (so any
dtype, bfloat16 included, round-trips bit for bit: the broker never reinterprets them),
and its identity in the header's ``__metadata__`` (strings only, the format's rule):
cache id, pool, model, dtype, shape, retain flag, priority, size. safetensors is the
well-kept format for tensors on disk; it rejects a truncated file or trailing bytes, but
a flipped bit loads silently (it has no checksum), so every file is also checked against
the size and digest that the generation's manifest records (``store``; the digest's
algorithm and its chunks: ``digests``).

Writing (``write_cache_file``): the header is the format's JSON padded with spaces (which
the format allows) so that the data starts at a multiple of 4 KiB; the data is then
written from the caller's buffer in ``CHUNK_BYTES`` writes that bypass the page cache
when the buffer is page-aligned (``directio``), then fsync'd; its chunks are hashed on
every core meanwhile, from the same buffer, so the digest covers exactly the file's
bytes without reading them back. Any safetensors reader reads the file
(``safetensors.safe_open`` checks every header here). Reading (``read_cache_file``):
the header is parsed and checked by ``safetensors.safe_open``; the data is read either
straight into a destination buffer (a host segment's mapping: no copy by the CPU at all
with direct I/O, several chunks in flight) or in chunks handed to a sink (a device
segment), each chunk hashed as soon as it is read. The caller must discard what the
destination or sink got when this raises.

Cost: write = one sequential direct write + fsync, overlapped with one hash pass over
memory; read = one sequential direct read, overlapped with one hash pass (plus one copy
into a sink's device).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvbroker.persistence.digests import (
    CHUNK_BYTES,
    DEFAULT_ALGORITHM,
    ChunkedDigest,
    chunk_digest,
    file_digest,
    new_hash,
    parse_file_digest,
)
from kvbroker.persistence.directio import ALIGN, DirectFile, aligned_buffer

__all__ = [
    "CHUNK_BYTES", "CacheMeta", "CorruptFile", "file_digest", "new_digest", "read_cache_file", "write_cache_file",
]  # fmt: skip

FORMAT = "kvbroker-cache/1"
TENSOR = "bytes"
#: Threads hashing chunks (and reading them into a destination): every core, at least
#: two (the digests release the GIL).
HASH_THREADS = max(2, os.cpu_count() or 2)


class CorruptFile(Exception):
    """A cache file is not what its manifest says (size, digest, header, metadata)."""


def new_digest() -> hashlib.blake2b:
    """The manifest's own digest (``store``): blake2b, a few KiB hashed per checkpoint."""
    return hashlib.blake2b(digest_size=32)


@dataclass(frozen=True)
class CacheMeta:
    """What a restored cache gets back besides its bytes."""

    cache_id: str
    pool: str
    model_name: str
    dtype: str
    shape: tuple[int, ...]
    retain: bool
    priority: int
    nbytes: int

    def to_strings(self) -> dict[str, str]:
        return {
            "format": FORMAT, "cache_id": self.cache_id, "pool": self.pool, "model_name": self.model_name,
            "dtype": self.dtype, "shape": json.dumps(list(self.shape)), "retain": "1" if self.retain else "0",
            "priority": str(self.priority), "nbytes": str(self.nbytes),
        }  # fmt: skip

    def to_json(self) -> dict:
        return {
            "cache_id": self.cache_id, "pool": self.pool, "model_name": self.model_name, "dtype": self.dtype,
            "shape": list(self.shape), "retain": self.retain, "priority": self.priority, "nbytes": self.nbytes,
        }  # fmt: skip

    @classmethod
    def from_strings(cls, data: dict[str, str] | None) -> CacheMeta:
        try:
            if not data or data.get("format") != FORMAT:
                raise CorruptFile(f"metadata is not {FORMAT}")
            return cls(
                data["cache_id"], data["pool"], data["model_name"], data["dtype"],
                tuple(int(n) for n in json.loads(data["shape"])), data["retain"] == "1",
                int(data["priority"]), int(data["nbytes"]),
            )  # fmt: skip
        except (KeyError, ValueError, TypeError) as err:
            raise CorruptFile(f"bad metadata: {err!r}") from None

    @classmethod
    def from_json(cls, data: dict) -> CacheMeta:
        try:
            return cls(
                str(data["cache_id"]), str(data["pool"]), str(data["model_name"]), str(data["dtype"]),
                tuple(int(n) for n in data["shape"]), bool(data["retain"]), int(data["priority"]),
                int(data["nbytes"]),
            )  # fmt: skip
        except (KeyError, ValueError, TypeError) as err:
            raise CorruptFile(f"bad manifest entry: {err!r}") from None


def _header(meta: CacheMeta) -> bytes:
    """The file's first bytes: the 8-byte length and the safetensors JSON header, padded
    with spaces so that the data starts on an ``ALIGN`` boundary (direct I/O)."""
    header = json.dumps(
        {"__metadata__": meta.to_strings(), TENSOR: {"dtype": "U8", "shape": [meta.nbytes], "data_offsets": [0, meta.nbytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    return struct.pack("<Q", len(header)) + header


def write_cache_file(path: str, meta: CacheMeta, data: np.ndarray) -> tuple[int, str]:
    """Write ``data`` (1-D uint8, ``meta.nbytes`` long) to ``path`` and fsync it.

    Returns the file's size and its digest (``digests.file_digest``). The data's chunks
    are hashed by a thread pool while the file is written (both release the GIL), so
    hashing costs no time when the disk is the slowest; a page-aligned ``data``
    (``directio.aligned_buffer``) is written past the page cache. Raises ``OSError``
    (ENOSPC...).
    """
    if data.dtype != np.uint8 or data.ndim != 1 or data.nbytes != meta.nbytes:
        raise ValueError(f"cache {meta.cache_id}: expected {meta.nbytes} uint8 bytes, got {data.dtype} {data.shape}")
    header = _header(meta)
    head_block = aligned_buffer(len(header))
    head_block[:] = np.frombuffer(header, dtype=np.uint8)
    algorithm = DEFAULT_ALGORITHM
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        data_digest = ChunkedDigest(pool, algorithm)
        for start in range(0, data.nbytes, CHUNK_BYTES):
            data_digest.add(data[start : start + CHUNK_BYTES])
        with DirectFile(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as f:
            f.write_all(0, head_block)
            for start in range(0, data.nbytes, CHUNK_BYTES):
                f.write_all(len(header) + start, data[start : start + CHUNK_BYTES])
            f.fsync()
            size = os.fstat(f.fd).st_size
        if size != len(header) + data.nbytes:
            raise OSError(f"{path}: wrote {size} bytes, expected {len(header) + data.nbytes}")
        return size, file_digest(algorithm, new_hash(algorithm, header).hexdigest(), data_digest.hexdigest())


#: Where ``read_cache_file`` puts the data: a callable ``sink(offset, chunk)`` given each
#: chunk in turn, or a writable buffer of exactly the cache's size read straight into.
Destination = Callable[[int, np.ndarray], None] | np.ndarray | memoryview


def read_cache_file(path: str, size: int, digest_hex: str, sink: Destination) -> CacheMeta:
    """Check ``path`` against ``size`` and ``digest_hex`` and put its data into ``sink``
    (see ``Destination``). Returns the file's metadata.

    Raises ``CorruptFile`` on any mismatch (the destination may have received bytes by
    then: the caller discards them) and ``OSError`` when the file cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    parsed = parse_file_digest(digest_hex)
    if parsed is None:
        raise CorruptFile(f"{name}: the manifest's digest {digest_hex[:40]!r} is not one this version checks")
    algorithm, head_hex, data_hex = parsed
    actual = os.stat(path).st_size
    if actual != size:
        raise CorruptFile(f"{name}: {actual} bytes, the manifest says {size}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = CacheMeta.from_strings(f.metadata())
            keys = list(f.keys())
            shape = f.get_slice(TENSOR).get_shape() if keys == [TENSOR] else None
    except SafetensorError as err:
        raise CorruptFile(f"{name}: not a valid safetensors file: {err}") from None
    if shape != [meta.nbytes]:
        raise CorruptFile(f"{name}: expected one tensor {TENSOR!r} of {meta.nbytes} bytes")
    with open(path, "rb") as f:
        raw = f.read(8)
        (header_len,) = struct.unpack("<Q", raw)
        header = raw + f.read(header_len)
    if size != len(header) + meta.nbytes:  # safe_open allows neither, but say which
        raise CorruptFile(f"{name}: {size} bytes for a {len(header)}-byte header and {meta.nbytes} data bytes")
    with DirectFile(path, os.O_RDONLY) as f, ThreadPoolExecutor(HASH_THREADS) as pool:
        data_digest = ChunkedDigest(pool, algorithm)
        if callable(sink):
            _read_to_sink(f, len(header), meta.nbytes, sink, data_digest, name)
        else:
            _read_into(f, len(header), meta.nbytes, memoryview(sink).cast("B"), pool, data_digest, name)
        found = data_digest.hexdigest()
    if new_hash(algorithm, header).hexdigest() != head_hex or found != data_hex:
        raise CorruptFile(f"{name}: {algorithm} digest differs from the manifest's")
    return meta


def _read_into(f: DirectFile, data_offset: int, nbytes: int, out: memoryview, pool: ThreadPoolExecutor,
               data_digest: ChunkedDigest, name: str) -> None:  # fmt: skip
    """Read the data straight into ``out``, one task per chunk (read, then hash it), so
    the pool's threads keep several reads in flight; no buffer is reused, so no chunk
    waits for another's hash."""
    if out.nbytes != nbytes:
        raise ValueError(f"{name}: the destination holds {out.nbytes} bytes, the file {nbytes}")

    def read_and_hash(start: int) -> bytes:
        chunk = out[start : start + CHUNK_BYTES]
        if f.read_into(data_offset + start, chunk) != chunk.nbytes:
            raise CorruptFile(f"{name}: ends inside the data chunk at {start} of {nbytes} bytes")
        return chunk_digest(data_digest.algorithm, chunk)

    for start in range(0, nbytes, CHUNK_BYTES):
        data_digest.add_digest(pool.submit(read_and_hash, start))


def _read_to_sink(f: DirectFile, data_offset: int, nbytes: int, sink: Callable[[int, np.ndarray], None],
                  data_digest: ChunkedDigest, name: str) -> None:  # fmt: skip
    """Read chunk after chunk into a ring of aligned buffers, hand each to ``sink`` on
    this thread while the pool hashes it (a buffer is reused once its chunk is hashed)."""
    ring = [aligned_buffer(min(CHUNK_BYTES, max(nbytes, 1))) for _ in range(HASH_THREADS + 1)]
    busy: list[Future[bytes] | None] = [None] * len(ring)
    offset, turn = 0, 0
    while offset < nbytes:
        if busy[turn] is not None:
            busy[turn].result()
        chunk = ring[turn][: min(CHUNK_BYTES, nbytes - offset)]
        if f.read_into(data_offset + offset, chunk) != chunk.nbytes:
            raise CorruptFile(f"{name}: ends after {offset} of {nbytes} data bytes")
        busy[turn] = data_digest.add(chunk)
        sink(offset, chunk)
        offset += chunk.nbytes
        turn = (turn + 1) % len(ring)
