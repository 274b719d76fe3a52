"""Generations of checkpoints in one directory, written so that a crash at any step
leaves a loadable state, and verified so that a torn one is never loaded.

Layout::

    <dir>/CURRENT              {"generation": N, "manifest_blake2b": ..., "previous": {...}}
    <dir>/gen-00000N/MANIFEST.json
    <dir>/gen-00000N/000000.safetensors ...

Writing generation N (``GenerationWriter``): each cache file as ``<name>.tmp``, fsync,
rename; then ``MANIFEST.json`` (each file's name, size, digest (``digests``: CRC-32 per
16 MiB chunk for new files) and the cache's metadata) the same way; fsync the directory; then ``CURRENT`` the same way (temp, fsync,
rename, fsync the directory): that rename is the commit point. Before it, a crash
leaves the previous ``CURRENT`` (and its generation) in charge; after it, the new one.
``CURRENT`` records the manifest's own digest and the previous generation's, so both
manifests are checked too. Between checkpoints two generations are on disk, the current
and the previous one; a checkpoint starts by removing every other generation (the
previous, and unpublished ones a crash left), so the budget counts the current one and
the new one, and publishing makes the old current the previous.

Reading (``Store.candidates`` and ``Store.open``): the current generation, then the
previous; one is accepted only when its manifest matches its digest, lists exactly the
files present, and (while loading, ``cachefile.read_cache_file``) every file matches its
size and digest and is bound to the cache id the manifest names.

Budget: ``max_bytes`` bounds what the directory holds (the kept generation plus the one
being written); a checkpoint that would exceed it fails at once with ``BudgetExceeded``,
and a full disk (ENOSPC, EDQUOT) with ``DiskFull``: the partial generation is removed,
nothing is retried until the next checkpoint is asked for.

``on_step(name)`` is called after each durable step (a seam for crash-injection tests).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvbroker.core.errors import BrokerError
from kvbroker.persistence.cachefile import CacheMeta, CorruptFile, new_digest, write_cache_file

CURRENT = "CURRENT"
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "kvbroker-manifest/1"
_GENERATION = re.compile(r"gen-(\d{6,})")
#: A file's bytes beyond its data: safetensors' 8-byte length and JSON header (the
#: metadata is a few hundred bytes; the header is padded to 8). Used to size a budget.
HEADER_ALLOWANCE_BYTES = 4096
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class PersistenceError(BrokerError):
    """A checkpoint could not be written (ABORTED; its subclasses RESOURCE_EXHAUSTED).
    ``reason`` is the metric's outcome label."""

    reason = "error"


class BudgetExceeded(PersistenceError):
    reason = "budget_exceeded"


class DiskFull(PersistenceError):
    reason = "disk_full"


class CorruptGeneration(Exception):
    """A generation failed its checks; it is never loaded."""


@dataclass(frozen=True)
class ManifestEntry:
    file: str
    size: int
    digest: str
    meta: CacheMeta


@dataclass(frozen=True)
class Generation:
    """A generation whose manifest passed its checks (its files are checked as read)."""

    number: int
    path: str
    entries: tuple[ManifestEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.size for e in self.entries)


def _name(number: int) -> str:
    return f"gen-{number:06d}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, whatever happens: temp, fsync, rename."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Store:
    """The checkpoint directory. Not thread-safe: the engine runs one checkpoint at a time.

    Args:
        directory: created (with parents) when missing.
        max_bytes: what the directory may hold; None for the disk's limit only.
        on_step: called with a step's name after each durable step.
    """

    def __init__(self, directory: str, max_bytes: int | None = None, *, on_step: Callable[[str], None] | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.on_step = on_step or (lambda step: None)
        os.makedirs(self.directory, exist_ok=True)

    # -- reading --------------------------------------------------------------------

    def current(self) -> dict | None:
        """``CURRENT``'s content, or None when there is none. Raises ``CorruptGeneration``."""
        try:
            with open(os.path.join(self.directory, CURRENT), "rb") as f:
                data = json.loads(f.read())
            int(data["generation"]), str(data["manifest_blake2b"])
            return data
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorruptGeneration(f"{CURRENT} is unreadable: {err!r}") from None

    def numbers(self) -> list[int]:
        """Generation numbers present on disk, newest first."""
        found = []
        for name in os.listdir(self.directory):
            match = _GENERATION.fullmatch(name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found, reverse=True)

    def candidates(self) -> list[tuple[int, str | None]]:
        """``(generation, manifest digest)`` to try in order: the current, then the
        previous. An unreadable ``CURRENT`` falls back to every generation on disk,
        newest first (their manifests' digests unknown)."""
        try:
            current = self.current()
        except CorruptGeneration:
            return [(n, None) for n in self.numbers()]
        if current is None:
            return []
        out = [(int(current["generation"]), str(current["manifest_blake2b"]))]
        previous = current.get("previous")
        if isinstance(previous, dict) and "generation" in previous:
            number = int(previous["generation"])
            # Pruned by a checkpoint that then failed: gone on purpose, not torn.
            if os.path.isdir(os.path.join(self.directory, _name(number))):
                out.append((number, str(previous.get("manifest_blake2b"))))
        return out

    def open(self, number: int, manifest_digest: str | None) -> Generation:
        """The generation's checked manifest. Raises ``CorruptGeneration``."""
        path = os.path.join(self.directory, _name(number))
        try:
            with open(os.path.join(path, MANIFEST), "rb") as f:
                raw = f.read()
        except OSError as err:
            raise CorruptGeneration(f"{_name(number)}: no readable {MANIFEST} ({err.strerror})") from None
        if manifest_digest is not None and new_digest_of(raw) != manifest_digest:
            raise CorruptGeneration(f"{_name(number)}: {MANIFEST} differs from the digest {CURRENT} recorded")
        try:
            data = json.loads(raw)
            if data.get("format") != MANIFEST_FORMAT or int(data["generation"]) != number:
                raise CorruptGeneration(f"{_name(number)}: {MANIFEST} is not generation {number} of {MANIFEST_FORMAT}")
            entries = tuple(
                # "blake2b": the key of the first format's digests (still checked).
                ManifestEntry(str(e["file"]), int(e["size"]), str(e["digest"] if "digest" in e else e["blake2b"]),
                              CacheMeta.from_json(e["cache"]))  # fmt: skip
                for e in data["files"]
            )
        except (ValueError, KeyError, TypeError, CorruptFile) as err:
            raise CorruptGeneration(f"{_name(number)}: {MANIFEST} is malformed: {err}") from None
        listed = {e.file for e in entries}
        present = set(os.listdir(path)) - {MANIFEST}
        if listed != present or len(listed) != len(entries):
            raise CorruptGeneration(
                f"{_name(number)}: files {sorted(present - listed)} are not in {MANIFEST}, "
                f"files {sorted(listed - present)} of it are missing"
            )
        return Generation(number, path, entries)

    # -- writing --------------------------------------------------------------------

    def begin(self, nbytes: int, ncaches: int) -> GenerationWriter:
        """Start the next generation for ``ncaches`` caches of ``nbytes`` in all.

        Removes every generation but the current one first. Raises ``BudgetExceeded``
        when the current generation and this one would not fit in ``max_bytes``, and
        ``DiskFull`` when the directory cannot be created for lack of space."""
        try:
            current = self.current()
        except CorruptGeneration:
            current = None
        keep = int(current["generation"]) if current else None
        numbers = self.numbers()
        for number in numbers:
            if number != keep:
                shutil.rmtree(os.path.join(self.directory, _name(number)), ignore_errors=True)
        kept_bytes = _tree_bytes(os.path.join(self.directory, _name(keep))) if keep is not None else 0
        allowance = None
        if self.max_bytes is not None:
            need = nbytes + ncaches * HEADER_ALLOWANCE_BYTES + HEADER_ALLOWANCE_BYTES
            allowance = self.max_bytes - kept_bytes
            if need > allowance:
                raise BudgetExceeded(
                    f"a checkpoint of {ncaches} caches needs about {need} bytes but persistence.max_bytes "
                    f"({self.max_bytes}) leaves {max(allowance, 0)} beside the kept generation ({kept_bytes} bytes)"
                )
        number = max([*numbers, 0]) + 1
        path = os.path.join(self.directory, _name(number))
        try:
            os.makedirs(path)
        except OSError as err:
            raise _as_error(err, path) from err
        return GenerationWriter(self, number, path, current, allowance)


def new_digest_of(data: bytes) -> str:
    digest = new_digest()
    digest.update(data)
    return digest.hexdigest()


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _as_error(err: OSError, path: str) -> PersistenceError:
    if err.errno in _DISK_FULL:
        return DiskFull(f"the disk of {path} is full ({err.strerror or err})")
    return PersistenceError(f"cannot write {path}: {err.strerror or err}")


class GenerationWriter:
    """One generation being written; ``publish`` commits it, ``abandon`` removes it."""

    def __init__(self, store: Store, number: int, path: str, current: dict | None, allowance: int | None) -> None:
        self.store = store
        self.number = number
        self.path = path
        self._current = current
        self._allowance = allowance
        self._entries: list[dict] = []
        self.written_bytes = 0

    def write(self, meta: CacheMeta, data: np.ndarray) -> int:
        """Write one cache's file (temp, fsync, rename). Returns its size. Raises
        ``BudgetExceeded``, ``DiskFull``, ``PersistenceError``."""
        name = f"{len(self._entries):06d}.safetensors"
        final = os.path.join(self.path, name)
        tmp = final + ".tmp"
        try:
            size, digest = write_cache_file(tmp, meta, data)
        except OSError as err:
            _unlink(tmp)
            raise _as_error(err, tmp) from err
        self.store.on_step("file-written")
        self.written_bytes += size
        if self._allowance is not None and self.written_bytes > self._allowance:
            _unlink(tmp)
            raise BudgetExceeded(f"the checkpoint outgrew persistence.max_bytes ({self.store.max_bytes})")
        os.replace(tmp, final)
        self.store.on_step("file-renamed")
        self._entries.append({"file": name, "size": size, "digest": digest, "cache": meta.to_json()})
        return size

    def publish(self) -> int:
        """Write the manifest, then point ``CURRENT`` at this generation (the commit
        point). Returns the generation number."""
        manifest = json.dumps(
            {"format": MANIFEST_FORMAT, "generation": self.number, "created_unix": time.time(), "files": self._entries},
            indent=1,
        ).encode()
        store = self.store
        try:
            write_atomic(os.path.join(self.path, MANIFEST), manifest)
            store.on_step("manifest-written")
            fsync_dir(self.path)
            fsync_dir(store.directory)
            store.on_step("directory-synced")
            pointer = {"generation": self.number, "manifest_blake2b": new_digest_of(manifest)}
            if self._current is not None:
                pointer["previous"] = {k: self._current[k] for k in ("generation", "manifest_blake2b")}
            tmp = os.path.join(store.directory, CURRENT + ".tmp")
            with open(tmp, "wb") as f:
                f.write(json.dumps(pointer).encode())
                f.flush()
                os.fsync(f.fileno())
            store.on_step("current-written")
            os.replace(tmp, os.path.join(store.directory, CURRENT))
            fsync_dir(store.directory)
        except OSError as err:
            raise _as_error(err, self.path) from err
        store.on_step("current-renamed")
        return self.number

    def abandon(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
