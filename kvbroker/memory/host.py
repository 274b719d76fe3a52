"""Host segments: named POSIX shared-memory objects that clients map zero-copy.

Each segment is one file under ``/dev/shm`` (tmpfs) named
``kvb-<pid>-<instance_id>-<segment_id>-<generation>``. The recipe is the verified one of
``research/ipc-mechanics.md`` section 5.5:

* ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600: never adopt or follow someone else's file;
* ``posix_fallocate``: a too-small ``/dev/shm`` fails here with ENOSPC instead of killing
  a process with SIGBUS on a later page touch;
* the server maps it ``MAP_SHARED`` and prefaults every page, so the kernel's zero-fill
  happens once, at creation, and not on a client's first write;
* ``free`` unlinks the name: new clients get ENOENT, mappings that exist stay valid, and
  the memory goes back when the last mapping goes.

The server never builds torch tensors over its mappings: it copies with
``ctypes.memmove`` on the mapped addresses (memcpy speed, GIL released), so it may unmap
at ``free`` without the SIGSEGV that closing a tensor-backing mmap causes.
``multiprocessing.shared_memory`` is never used: its resource tracker unlinks segments
behind the broker's back.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import re
import stat
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kvbroker.core.errors import ResourceExhausted
from kvbroker.core.types import Move, SegmentInfo
from kvbroker.memory.backend import HostHandle, check_move, check_range

logger = logging.getLogger(__name__)

#: Every name this backend creates, and every name a client will open, matches this.
SHM_NAME_PATTERN = re.compile(r"kvb-[A-Za-z0-9_.-]{1,200}")
#: The parts of a name, for stale-segment cleanup. The instance id may contain dashes;
#: segment id and generation are the last two numeric parts.
_NAME_PARTS = re.compile(r"kvb-(\d+)-(.+)-(\d+)-(\d+)")
INSTANCE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
#: ``MADV_POPULATE_WRITE`` (Linux 5.14+): fault every page in writable, in one syscall.
#: Python 3.11's mmap module does not export the constant; its value is 23 on Linux.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)


@dataclass(slots=True)
class _Segment:
    """One live segment and the server's own mapping of it.

    ``buffer`` is a ctypes view that holds a buffer export on ``mapping``: while it lives,
    ``mapping.close()`` raises ``BufferError`` instead of leaving ``address`` dangling.
    """

    info: SegmentInfo
    path: str
    handle: HostHandle
    mapping: mmap.mmap
    buffer: ctypes.Array[ctypes.c_char]
    address: int

    def unmap(self) -> None:
        del self.buffer
        self.mapping.close()


class HostMemory:
    """The ``SegmentMemory`` of the host device, in named POSIX shared memory.

    Thread-safe: one lock guards the segment table and is held for the whole of each
    ``copy``, ``read`` and ``write``, so ``free`` waits for an in-flight copy instead of
    unmapping memory under it. ``create`` does its slow part (fallocate, prefault)
    outside the lock.

    Args:
        instance_id: identifies this broker instance inside object names; 1 to 64
            characters of ``[A-Za-z0-9_.-]``.
        shm_dir: the tmpfs where objects live (``/dev/shm``; tests may pass another
            directory).
    """

    def __init__(self, instance_id: str, *, shm_dir: str = "/dev/shm") -> None:
        if not INSTANCE_ID_PATTERN.fullmatch(instance_id):
            raise ValueError(
                f"instance_id {instance_id!r} must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
            )
        if not os.path.isdir(shm_dir):
            raise FileNotFoundError(errno.ENOENT, "shared-memory directory does not exist", shm_dir)
        self._instance_id = instance_id
        self._shm_dir = shm_dir
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._creating: set[int] = set()
        self._closed = False

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def shm_dir(self) -> str:
        return self._shm_dir

    def object_name(self, segment_id: int, generation: int) -> str:
        """The shm object name of a segment: ``kvb-<pid>-<instance>-<segment>-<gen>``.

        The pid lets ``remove_stale_segments`` recognise a dead broker's leftovers; the
        generation makes a reused segment id a new name, so a stale handle never opens it.
        """
        name = f"kvb-{self._pid}-{self._instance_id}-{segment_id}-{generation}"
        if not SHM_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"segment object name {name!r} does not match {SHM_NAME_PATTERN.pattern}")
        return name

    def create(self, segment: SegmentInfo) -> None:
        """Create, reserve, map and prefault one segment. See ``SegmentMemory.create``.

        Cost: ``posix_fallocate`` plus one write fault per page (about 0.2 + 0.4 s per GiB
        with 4 KiB pages on a small VM); nothing is held locked meanwhile.

        Raises:
            ResourceExhausted: ``/dev/shm`` (or the memory cgroup) has no room.
            FileExistsError: an object of that name exists (another instance with the same
                id and pid, or a leftover): it is left untouched.
            ValueError: the id is in use, the size is not positive, or the backend is closed.
        """
        if segment.nbytes <= 0:
            raise ValueError(f"segment {segment.segment_id}: nbytes must be positive, got {segment.nbytes}")
        name = self.object_name(segment.segment_id, segment.generation)
        with self._lock:
            if self._closed:
                raise ValueError("HostMemory is closed")
            if segment.segment_id in self._segments or segment.segment_id in self._creating:
                raise ValueError(f"segment {segment.segment_id} already exists")
            self._creating.add(segment.segment_id)
        try:
            created = self._create_segment(segment, name)
        finally:
            with self._lock:
                self._creating.discard(segment.segment_id)
        with self._lock:
            if not self._closed:
                self._segments[segment.segment_id] = created
                return
        self._discard(created)  # closed while we were creating: do not leak the object
        raise ValueError("HostMemory was closed while the segment was being created")

    def _create_segment(self, segment: SegmentInfo, name: str) -> _Segment:
        path = os.path.join(self._shm_dir, name)
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST,
                "shared-memory object already exists (a broker with the same instance id "
                "and pid, or a leftover); refusing to adopt it",
                path,
            ) from None
        try:
            try:
                os.fchmod(fd, 0o600)  # exact mode whatever the umask
                _fallocate(fd, segment.nbytes)
                st = os.fstat(fd)
                mapping = mmap.mmap(fd, segment.nbytes, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            try:
                buffer = (ctypes.c_char * segment.nbytes).from_buffer(mapping)
                address = ctypes.addressof(buffer)
                _prefault(mapping, address, segment.nbytes)
            except BaseException:
                buffer = None
                mapping.close()
                raise
        except OSError as err:
            _unlink_quietly(path)
            if err.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
                raise self._exhausted(segment, err) from err
            raise
        except BaseException:
            _unlink_quietly(path)
            raise
        handle = HostHandle(shm_name=name, size_bytes=segment.nbytes, st_dev=st.st_dev, st_ino=st.st_ino)
        return _Segment(segment, path, handle, mapping, buffer, address)

    def _exhausted(self, segment: SegmentInfo, err: OSError) -> ResourceExhausted:
        try:
            vfs = os.statvfs(self._shm_dir)
            free = vfs.f_bavail * vfs.f_frsize
        except OSError:
            free = 0
        return ResourceExhausted(
            f"host shared memory ({self._shm_dir}) has no room for segment "
            f"{segment.segment_id}: {os.strerror(err.errno or 0)}; give the broker a larger "
            "/dev/shm (docker --shm-size, a Memory emptyDir in Kubernetes)",
            requested_bytes=segment.nbytes,
            free_bytes=free,
            largest_free_extent_bytes=free,
            satisfiable=False,
        )

    def free(self, segment_id: int) -> None:
        """Unlink the segment's object and drop the server's mapping. Idempotent.

        Clients that still map it keep valid memory until they unmap; the daemon calls
        this only once none does. Cost: waits for an in-flight ``copy``; then O(1).
        """
        with self._lock:
            seg = self._segments.pop(segment_id, None)
        if seg is not None:
            self._discard(seg)

    def _discard(self, seg: _Segment) -> None:
        try:
            st = os.lstat(seg.path)
            if (st.st_dev, st.st_ino) == (seg.handle.st_dev, seg.handle.st_ino):
                os.unlink(seg.path)  # only our own object, never a look-alike
        except FileNotFoundError:
            pass
        seg.unmap()

    def close(self) -> None:
        """Free every segment and refuse new ones. Idempotent."""
        with self._lock:
            self._closed = True
            segments = list(self._segments.values())
            self._segments.clear()
        for seg in segments:
            self._discard(seg)

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def handle(self, segment_id: int) -> HostHandle:
        """The segment's ``HostHandle``. Raises ``KeyError`` for an unknown id."""
        with self._lock:
            return self._get(segment_id).handle

    def segment_ids(self) -> list[int]:
        """Ids of the live segments, sorted."""
        with self._lock:
            return sorted(self._segments)

    def copy(self, moves: Sequence[Move]) -> None:
        """Apply moves in order with ``memmove`` semantics. See ``SegmentMemory.copy``.

        Every move is validated before the first byte moves, so a bad plan changes
        nothing. Cost: one ``memmove`` per move at memcpy bandwidth, with the GIL released.
        """
        with self._lock:
            sizes = {sid: seg.info.nbytes for sid, seg in self._segments.items()}
            checked = [check_move(move, sizes) for move in moves]
            for src, dst in checked:
                if src.nbytes and src != dst:
                    ctypes.memmove(
                        self._segments[dst.segment_id].address + dst.offset,
                        self._segments[src.segment_id].address + src.offset,
                        src.nbytes,
                    )

    def read(self, segment_id: int, offset: int, nbytes: int) -> bytes:
        """Copy ``nbytes`` out of a segment at ``offset``."""
        with self._lock:
            seg = self._get(segment_id)
            check_range(segment_id, seg.info.nbytes, offset, nbytes)
            return ctypes.string_at(seg.address + offset, nbytes)

    def write(self, segment_id: int, offset: int, data: bytes) -> None:
        """Copy ``data`` into a segment at ``offset``."""
        view = memoryview(data).cast("B")
        with self._lock:
            seg = self._get(segment_id)
            check_range(segment_id, seg.info.nbytes, offset, view.nbytes)
            seg.mapping[offset : offset + view.nbytes] = view

    def _get(self, segment_id: int) -> _Segment:
        try:
            return self._segments[segment_id]
        except KeyError:
            raise KeyError(f"segment {segment_id} does not exist on the host device") from None


def _fallocate(fd: int, nbytes: int) -> None:
    """Reserve ``nbytes`` now; tmpfs may return EINTR for a large request, so retry."""
    while True:
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except InterruptedError:
            continue


def _prefault(mapping: mmap.mmap, address: int, nbytes: int) -> None:
    """Fault every page in writable (the kernel zero-fills it on that first fault).

    ``MADV_POPULATE_WRITE`` does it in one syscall; without it (kernel < 5.14), write
    zeros to every byte, which touches every page the same way.
    """
    if _MADV_POPULATE_WRITE is not None:
        try:
            mapping.madvise(_MADV_POPULATE_WRITE, 0, nbytes)
            return
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: the kernel does not know the advice
                raise
    ctypes.memset(address, 0, nbytes)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_segments(shm_dir: str = "/dev/shm", *, instance_id: str | None = None) -> list[str]:
    """Unlink the segment objects a dead broker left behind; return their names.

    An object ``kvb-<pid>-...`` is stale when no process ``pid`` is alive. When
    ``instance_id`` is given, objects carrying this process's own pid but another
    instance id are stale too (a restarted container's broker is often pid 1 again).
    Objects that are not regular files, or that this user may not unlink, are kept.

    A reused pid makes a dead broker's object look alive: it is then kept (a leak, never
    a wrong unlink). Cost: one ``listdir`` and one ``kill(pid, 0)`` per candidate.
    """
    own_pid = os.getpid()
    removed: list[str] = []
    for name in sorted(os.listdir(shm_dir)):
        parts = _NAME_PARTS.fullmatch(name)
        if parts is None or not SHM_NAME_PATTERN.fullmatch(name):
            continue
        pid, owner_instance = int(parts[1]), parts[2]
        if pid == own_pid:
            if instance_id is None or owner_instance == instance_id:
                continue
        elif _pid_alive(pid):
            continue
        path = os.path.join(shm_dir, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        except PermissionError:
            logger.warning("cannot remove stale shared-memory object %s: permission denied", path)
            continue
        logger.info("removed stale shared-memory object %s", path)
        removed.append(name)
    return removed
