"""The digests that cover a cache file's bytes: one algorithm per file, named in the
digest string the manifest records, the data hashed in chunks on every core at once.

A digest string is ``<algorithm>:<header digest>:<data digest>`` (``file_digest``); the
header digest covers the 8-byte length and the JSON header, the data digest
(``ChunkedDigest``) is the algorithm over the digests of the data's ``CHUNK_BYTES``
chunks in order. Every byte of the file is covered, and a reader hashes the same chunks.
A string of two parts is the first format's (blake2b throughout) and is still checked.

**Why CRC-32C for new files** (``DEFAULT_ALGORITHM``). What the digest must catch is
damage, not an adversary: a torn or truncated write, a flipped bit, a file of another
cache (the size, the header's cache id and the manifest's own blake2b catch the rest).
Measured on the project's shared 2-core VM (CPU-seconds per GiB, one thread):
blake2b 1.28, sha256 0.63 (SHA-NI), sha1 0.58, zlib.crc32 0.27-0.36, adler32 0.32,
CRC-32C (the ``crc32c`` package, the CPU's CRC32 instruction) 0.07-0.10. Hashing was
the largest single cost of a restore (the author's profile: 1.25 of 3.4 CPU-s per GiB
with blake2b), and a restore must run at half a plain read's speed. A CRC-32 detects
every error of up to 32 consecutive bits and every 1- or 2-bit error in a 16 MiB chunk,
and misses other damage with probability 2^-32 per chunk; CRC-32C (Castagnoli) is the
polynomial storage picked for that job (iSCSI, ext4 metadata, Btrfs, RocksDB's blocks).
Both release the GIL, so chunks are hashed in parallel. Files written with zlib's CRC-32
(``crc32``, the format before) are still checked.
"""

from __future__ import annotations

import hashlib
import zlib

import crc32c
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

#: Chunk of the data's digest, part of the format: a reader hashes the same chunks. Large
#: enough for sequential-I/O speed, small enough to bound the memory in flight; a
#: multiple of the direct-I/O alignment (``directio.ALIGN``).
CHUNK_BYTES = 16 * 2**20


class _Crc32:
    """zlib.crc32 with hashlib's ``update``/``digest``/``hexdigest`` interface."""

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self._value = zlib.crc32(data)

    def update(self, data: bytes | memoryview) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


class _Crc32c(_Crc32):
    """CRC-32C (the ``crc32c`` package: the CPU's instruction where it has one, GIL
    released) with hashlib's interface."""

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self._value = crc32c.crc32c(data)

    def update(self, data: bytes | memoryview) -> None:
        self._value = crc32c.crc32c(data, self._value)


ALGORITHMS: dict[str, Callable[..., object]] = {
    "crc32c": _Crc32c,
    "crc32": _Crc32,
    "sha256": hashlib.sha256,
    "blake2b": lambda data=b"": hashlib.blake2b(data, digest_size=32),
}
DEFAULT_ALGORITHM = "crc32c"
#: The algorithm of a two-part digest string (the first format).
LEGACY_ALGORITHM = "blake2b"


def new_hash(algorithm: str = DEFAULT_ALGORITHM, data: bytes | memoryview = b""):
    """A fresh hash object of ``algorithm`` (hashlib's interface), fed ``data``."""
    return ALGORITHMS[algorithm](data)


def _chunk_digest(algorithm: str, chunk: memoryview) -> bytes:
    return ALGORITHMS[algorithm](chunk).digest()


class ChunkedDigest:
    """The algorithm over the digests of the data's ``CHUNK_BYTES`` chunks, in order:
    every byte covered, the chunks hashed by ``pool``'s threads at once (a digest
    releases the GIL). A chunk must not change until ``hexdigest`` returns."""

    def __init__(self, pool: ThreadPoolExecutor, algorithm: str = DEFAULT_ALGORITHM) -> None:
        self._pool = pool
        self.algorithm = algorithm
        self._parts: list[Future[bytes]] = []

    def add(self, chunk) -> Future[bytes]:
        """Hash one chunk (any buffer) in the pool; chunks must come in order."""
        future = self._pool.submit(_chunk_digest, self.algorithm, memoryview(chunk).cast("B"))
        self._parts.append(future)
        return future

    def hexdigest(self) -> str:
        top = new_hash(self.algorithm)
        for part in self._parts:
            top.update(part.result())
        return top.hexdigest()


def file_digest(algorithm: str, head_hex: str, data_hex: str) -> str:
    """A file's digest as the manifest records it (see the module docstring)."""
    return f"{algorithm}:{head_hex}:{data_hex}"


def parse_file_digest(digest: str) -> tuple[str, str, str] | None:
    """``(algorithm, header hex, data hex)`` of a digest string, or None when it is
    malformed or names an algorithm this version does not know."""
    parts = digest.split(":")
    if len(parts) == 2:
        parts = [LEGACY_ALGORITHM, *parts]
    if len(parts) != 3 or parts[0] not in ALGORITHMS:
        return None
    return parts[0], parts[1], parts[2]
