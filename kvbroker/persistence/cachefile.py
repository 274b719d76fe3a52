"""One cache as one safetensors file, bound to its cache by id.

The file holds the cache's bytes as one 1-D ``uint8`` tensor named ``bytes`` (so any
dtype, bfloat16 included, round-trips bit for bit: the broker never reinterprets them),
and its identity in the header's ``__metadata__`` (strings only, the format's rule):
cache id, pool, model, dtype, shape, retain flag, priority, size. safetensors is the
well-kept format for tensors on disk; it rejects a truncated file or trailing bytes, but
a flipped bit loads silently (it has no checksum), so every file is also checked against
the size and blake2b digest that the generation's manifest records (``store``).

Writing (``write_cache_file``): ``safetensors.numpy.save_file`` straight from the staging
buffer (no extra copy: safetensors 0.8 reads the array's memory), then fsync; the digest
(``file_digest``: blake2b of the header, blake2b of the data's chunk digests) covers
exactly the file's bytes, the data's chunks hashed on every core from the staging
buffer while the file is written, without reading it back. Reading (``read_cache_file``): the header is parsed and checked by
``safetensors.safe_open``, then the data is streamed in chunks into a sink (a segment of
the device) while the chunks already read are hashed; the caller must discard what the
sink got when this raises.

Cost: write = one sequential write + fsync, overlapped with one hash pass over memory;
read = one sequential read, overlapped with one hash pass and one copy into the sink.
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

FORMAT = "kvbroker-cache/1"
TENSOR = "bytes"
#: Chunk of a streamed read and of the data's digest (``ChunkedDigest``): large enough
#: for sequential-read speed, small enough to keep the daemon's extra memory bounded
#: whatever the cache's size. Part of the format: a reader hashes the same chunks.
CHUNK_BYTES = 16 * 2**20
#: Threads hashing chunks: every core (blake2b releases the GIL).
HASH_THREADS = max(2, os.cpu_count() or 2)


class CorruptFile(Exception):
    """A cache file is not what its manifest says (size, digest, header, metadata)."""


def new_digest() -> hashlib.blake2b:
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


def write_cache_file(path: str, meta: CacheMeta, data: np.ndarray) -> tuple[int, str]:
    """Write ``data`` (1-D uint8, ``meta.nbytes`` long) to ``path`` and fsync it.

    Returns the file's size and its digest (``file_digest``). The data's chunks are
    hashed by a thread pool while safetensors writes (all release the GIL), so hashing
    costs no time when the disk is the slowest. Raises ``OSError`` (ENOSPC...).
    """
    from safetensors.numpy import save_file

    if data.dtype != np.uint8 or data.ndim != 1 or data.nbytes != meta.nbytes:
        raise ValueError(f"cache {meta.cache_id}: expected {meta.nbytes} uint8 bytes, got {data.dtype} {data.shape}")
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        data_digest = ChunkedDigest(pool)
        for start in range(0, data.nbytes, CHUNK_BYTES):
            data_digest.add(data[start : start + CHUNK_BYTES])
        try:
            save_file({TENSOR: data}, path, metadata=meta.to_strings())
        except Exception as err:  # safetensors raises its own error for an I/O failure
            if isinstance(err, OSError):
                raise
            raise OSError(getattr(err, "errno", None) or _errno_of(str(err)), f"writing {path}: {err}") from err
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = os.pread(fd, header_len, 8)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != 8 + header_len + data.nbytes:
            raise OSError(f"{path}: wrote {size} bytes, expected {8 + header_len + data.nbytes}")
        head = new_digest()
        head.update(struct.pack("<Q", header_len))
        head.update(header)
        return size, file_digest(head.hexdigest(), data_digest.hexdigest())


def _chunk_digest(chunk: np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(chunk), digest_size=32).digest()


class ChunkedDigest:
    """blake2b of the blake2b digests of the data's ``CHUNK_BYTES`` chunks, in order:
    every byte covered, and the chunks hashed on every core at once (one blake2b
    stream runs at about 0.7 GiB/s on this project's VM, slower than a disk read).
    A chunk must not change until ``hexdigest`` returns."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._parts: list[Future[bytes]] = []

    def add(self, chunk: np.ndarray) -> Future[bytes]:
        future = self._pool.submit(_chunk_digest, chunk)
        self._parts.append(future)
        return future

    def hexdigest(self) -> str:
        top = new_digest()
        for part in self._parts:
            top.update(part.result())
        return top.hexdigest()


def file_digest(head_hex: str, data_hex: str) -> str:
    """A file's digest as the manifest records it: ``<blake2b of the 8-byte length and
    the JSON header>:<ChunkedDigest of the data>``. Two parts rather than one stream over
    the whole file so that the data's is computed in parallel, while the file is written
    and read (every byte of the file is still covered)."""
    return f"{head_hex}:{data_hex}"


def _errno_of(message: str) -> int:
    import errno

    return errno.ENOSPC if "No space left" in message else errno.EIO


def read_cache_file(
    path: str, size: int, digest_hex: str, sink: Callable[[int, np.ndarray], None]
) -> CacheMeta:
    """Check ``path`` against ``size`` and ``digest_hex`` and stream its bytes to
    ``sink(offset, chunk)``. Returns the file's metadata.

    Raises ``CorruptFile`` on any mismatch (the sink may have received bytes by then:
    the caller discards them) and ``OSError`` when the file cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    actual = os.stat(path).st_size
    if actual != size:
        raise CorruptFile(f"{os.path.basename(path)}: {actual} bytes, the manifest says {size}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = CacheMeta.from_strings(f.metadata())
            keys = list(f.keys())
            shape = f.get_slice(TENSOR).get_shape() if keys == [TENSOR] else None
    except SafetensorError as err:
        raise CorruptFile(f"{os.path.basename(path)}: not a valid safetensors file: {err}") from None
    if shape != [meta.nbytes]:
        raise CorruptFile(f"{os.path.basename(path)}: expected one tensor {TENSOR!r} of {meta.nbytes} bytes")
    head = new_digest()
    ring = [np.empty(min(CHUNK_BYTES, max(meta.nbytes, 1)), dtype=np.uint8) for _ in range(HASH_THREADS + 1)]
    busy: list[Future[bytes] | None] = [None] * len(ring)
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(HASH_THREADS) as pool:
        raw = f.read(8)
        (header_len,) = struct.unpack("<Q", raw)
        head.update(raw)
        head.update(f.read(header_len))
        data_digest = ChunkedDigest(pool)
        # This thread reads and copies to the sink; the pool hashes the chunks already
        # read (a buffer of the ring is reused once its chunk is hashed).
        offset, turn = 0, 0
        while offset < meta.nbytes:
            if busy[turn] is not None:
                busy[turn].result()
            chunk = ring[turn][: min(CHUNK_BYTES, meta.nbytes - offset)]
            filled = 0
            while filled < chunk.nbytes:
                n = f.readinto(memoryview(chunk)[filled:])
                if not n:
                    raise CorruptFile(f"{os.path.basename(path)}: ends after {offset + filled} of {meta.nbytes} data bytes")
                filled += n
            busy[turn] = data_digest.add(chunk)
            sink(offset, chunk)
            offset += chunk.nbytes
            turn = (turn + 1) % len(ring)
        if f.read(1):
            raise CorruptFile(f"{os.path.basename(path)}: trailing bytes")
        data_hex = data_digest.hexdigest()
    if file_digest(head.hexdigest(), data_hex) != digest_hex:
        raise CorruptFile(f"{os.path.basename(path)}: blake2b digest differs from the manifest's")
    return meta
