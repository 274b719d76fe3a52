"""Host segments: named POSIX shared-memory objects that clients map zero-copy.

Each segment is one file in the shm directory (``/dev/shm``, a tmpfs) named
``kvb-<pid>-<instance_id>-<segment_id>-<generation>``. How one is made, and why:

* ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600: never adopt or follow someone else's file;
* ``posix_fallocate``: a too-small tmpfs fails here with ENOSPC instead of killing a
  process with SIGBUS on a later page touch (``ftruncate`` reserves nothing);
* the server maps it shared with ``mmap(2)`` and closes the descriptor at once (a mapping
  keeps the object alive; a broker with many segments must not hold a descriptor each),
  then prefaults every page, so the kernel's zero-fill happens once, at creation, and not
  on a client's first write (except a segment a restore overwrites whole: ``write_from``);
* ``free`` unlinks the name: new clients get ENOENT, mappings that exist stay valid, and
  the memory goes back when the last mapping goes.

The server never builds torch tensors over its mappings: it copies with ``ctypes.memmove``
and zeroes with ``ctypes.memset`` on the mapped addresses (memcpy speed, GIL released), so
it can unmap at ``free``. ``multiprocessing.shared_memory`` is never used: on Python < 3.13
its resource tracker unlinks segments at the exit of any process that merely attached.

Ownership: the instance holds a lock file in the shm directory for its whole life (see
``kvbroker.memory.owner``), and at start-up removes the objects of instances whose lock
is free, i.e. that are dead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvbroker.core.errors import ResourceExhausted, amount
from kvbroker.core.types import MiB, Move, SegmentInfo
from kvbroker.memory import shm
from kvbroker.memory.backend import CopyError, HostHandle, check_move, check_range
from kvbroker.memory.chunks import STAGING, Place, run_moves, staging_needed
from kvbroker.memory.owner import OwnerLock, remove_stale_segments
from kvbroker.memory.parallel import ParallelCopier
from kvbroker.wire import SHM_NAME_PATTERN

__all__ = ["INSTANCE_ID_PATTERN", "HostMemory", "remove_stale_segments"]

INSTANCE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass(slots=True)
class _Segment:
    """One live segment and the server's own mapping of it (``address``, ``nbytes``).

    ``users`` counts the copies and zeroes running on it without the table lock held;
    ``free`` waits for it to reach 0 before unmapping. ``prefaulted``: created with every
    page mapped into the server (``create(prefault=True)``), which ``write_from`` uses.
    """

    info: SegmentInfo
    path: str
    handle: HostHandle
    address: int
    prefaulted: bool = True
    users: int = 0

    def unmap(self) -> None:
        shm.unmap(self.address, self.info.nbytes)


class HostMemory:
    """The ``SegmentMemory`` of the host device, in named POSIX shared memory.

    Thread-safe. A lock guards the segment table and is held only for table updates;
    ``copy`` and ``zero`` run with it released, marking their segments in use, and
    ``free``/``close`` wait until a segment is unused before unmapping it. So zeroing one
    cache does not stall the creation, zeroing or handle of another.

    Args:
        instance_id: identifies this broker instance inside object names; 1 to 64
            characters of ``[A-Za-z0-9_.-]``.
        shm_dir: the tmpfs where objects live (``/dev/shm``; tests may pass another
            directory). The handles carry its absolute path.
        remove_stale: at start-up, remove the objects of dead broker instances in
            ``shm_dir`` (``stale_removed`` lists them).
        copy_threads: threads that copy one large range at once (``copy``); 0: the
            cores available, at most 8 (``kvbroker.memory.parallel``).

    Raises:
        FileExistsError: an instance with this id already runs in this process (or, with
            the same pid, in another PID namespace) on this directory.
    """

    #: Overlapping moves closer than this are staged; farther ones copy directly in
    #: chunks of the distance. Class attributes so a test subclass can shrink them.
    DIRECT_CHUNK_MIN_BYTES = 1 * MiB
    #: The largest staging buffer a copy allocates (anonymous memory, touched only as far
    #: as used, unmapped when the copy returns).
    STAGING_BYTES = 64 * MiB

    #: Ranges at least this large are copied by ``copy_threads`` threads at once.
    PARALLEL_MIN_BYTES = 4 * MiB
    PARALLEL_PIECE_ALIGN = 4096

    def __init__(
        self, instance_id: str, *, shm_dir: str = "/dev/shm", remove_stale: bool = True, copy_threads: int = 0,
    ) -> None:
        if not INSTANCE_ID_PATTERN.fullmatch(instance_id):
            raise ValueError(
                f"instance_id {instance_id!r} must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
            )
        if not os.path.isdir(shm_dir):
            raise FileNotFoundError(errno.ENOENT, "shared-memory directory does not exist", shm_dir)
        self._instance_id = instance_id
        self._shm_dir = os.path.abspath(shm_dir)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._segments: dict[int, _Segment] = {}
        self._creating: set[int] = set()
        self._closed = False
        self._copier = ParallelCopier(
            copy_threads, min_bytes=self.PARALLEL_MIN_BYTES, align=self.PARALLEL_PIECE_ALIGN
        )
        # The lock first: from here on no clean-up (ours below included) takes this
        # instance for dead.
        self._owner = OwnerLock(self._shm_dir, f"{self._pid}-{instance_id}")
        try:
            self.stale_removed: list[str] = remove_stale_segments(self._shm_dir) if remove_stale else []
        except BaseException:
            self._owner.release()
            raise

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def shm_dir(self) -> str:
        return self._shm_dir

    @property
    def lock_path(self) -> str:
        """The lock file this instance holds while it lives."""
        return self._owner.path

    def object_name(self, segment_id: int, generation: int) -> str:
        """The shm object name of a segment: ``kvb-<pid>-<instance>-<segment>-<gen>``.

        ``<pid>-<instance>`` names the owner whose lock file decides whether the object
        is stale; the generation makes a reused segment id a new name, so a stale handle
        never opens it.
        """
        name = f"kvb-{self._pid}-{self._instance_id}-{segment_id}-{generation}"
        if not SHM_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"segment object name {name!r} does not match {SHM_NAME_PATTERN.pattern}")
        return name

    def create(self, segment: SegmentInfo, *, prefault: bool = True) -> None:
        """Create, reserve, map and (``prefault``) prefault one segment. See
        ``SegmentMemory.create``.

        On failure nothing is left behind (the object is unlinked, the mapping removed).
        Cost: ``posix_fallocate`` plus one write fault per page (about 0.25 + 0.3 s per
        GiB with 4 KiB pages on the project's 2-core VM); the table lock is not held
        meanwhile. Without ``prefault`` only the first: tmpfs allocates the pages but
        zeroes none of them until they are faulted (a read then sees zeros) or written
        whole (``write_from``, which then never zeroes them at all).

        Raises:
            ResourceExhausted: no room in ``/dev/shm`` (or the memory cgroup), no file
                descriptor left (``ulimit -n``), or no mapping left (``vm.max_map_count``).
            FileExistsError: an object of that name exists (a leftover): left untouched.
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
            created = self._create_segment(segment, name, prefault)
        finally:
            with self._lock:
                self._creating.discard(segment.segment_id)
        with self._lock:
            if not self._closed:
                self._segments[segment.segment_id] = created
                return
        self._discard(created)  # closed while we were creating: do not leak the object
        raise ValueError("HostMemory was closed while the segment was being created")

    def _create_segment(self, segment: SegmentInfo, name: str, prefault: bool) -> _Segment:
        path = os.path.join(self._shm_dir, name)
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST,
                "shared-memory object already exists (a leftover of this instance's "
                "pid and id); refusing to adopt it",
                path,
            ) from None
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                raise self._exhausted(segment, err, _NOFILE_ADVICE) from err
            raise
        address = None
        try:
            try:
                os.fchmod(fd, 0o600)  # exact mode whatever the umask
                try:
                    shm.fallocate(fd, segment.nbytes)
                except OSError as err:
                    if err.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
                        raise self._exhausted(segment, err, _SHM_ADVICE) from err
                    raise
                st = os.fstat(fd)
                try:
                    address = shm.map_shared(fd, segment.nbytes)
                except OSError as err:
                    if err.errno == errno.ENOMEM:
                        raise self._exhausted(segment, err, _MAPS_ADVICE) from err
                    raise
            finally:
                os.close(fd)  # the mapping keeps the object; no descriptor per segment
            try:
                if prefault:
                    shm.populate(address, segment.nbytes)
            except OSError as err:
                if err.errno in (errno.ENOMEM, errno.EFAULT):
                    raise self._exhausted(segment, err, _SHM_ADVICE) from err
                raise
        except BaseException:
            if address is not None:
                shm.unmap(address, segment.nbytes)
            _unlink_quietly(path)
            raise
        handle = HostHandle(
            shm_name=name, size_bytes=segment.nbytes, st_dev=st.st_dev, st_ino=st.st_ino, shm_dir=self._shm_dir
        )
        return _Segment(segment, path, handle, address, prefaulted=prefault)

    def _exhausted(self, segment: SegmentInfo, err: OSError, advice: str) -> ResourceExhausted:
        try:
            vfs = os.statvfs(self._shm_dir)
            free = vfs.f_bavail * vfs.f_frsize
        except OSError:
            free = 0
        with self._lock:
            live = len(self._segments)
        return ResourceExhausted(
            f"cannot create host segment {segment.segment_id} of {amount(segment.nbytes)} in "
            f"{self._shm_dir}: {os.strerror(err.errno or 0)} ({live} segments live), "
            f"{amount(free)} free there; {advice}",
            requested_bytes=segment.nbytes,
            free_bytes=free,
            largest_free_extent_bytes=free,
            satisfiable=False,
        )

    def free(self, segment_id: int) -> None:
        """Unlink the segment's object and drop the server's mapping. Idempotent.

        Clients that still map it keep valid memory until they unmap; the daemon calls
        this only once none does. Cost: waits for copies and zeroes using the segment;
        then O(1).
        """
        with self._lock:
            seg = self._segments.pop(segment_id, None)
            if seg is None:
                return
            self._idle.wait_for(lambda: seg.users == 0)
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
        """Free every segment, release the instance's lock file, refuse new segments.
        Idempotent."""
        with self._lock:
            self._closed = True
            segments = list(self._segments.values())
            self._segments.clear()
            self._idle.wait_for(lambda: all(seg.users == 0 for seg in segments))
        for seg in segments:
            self._discard(seg)
        self._copier.close()
        self._owner.release()

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

    @contextmanager
    def _using(self, segment_ids: Iterable[int]) -> Iterator[dict[int, _Segment]]:
        """Mark segments in use (``free`` waits for them) while the body runs unlocked."""
        with self._lock:
            segments = {sid: self._get(sid) for sid in set(segment_ids)}
            for seg in segments.values():
                seg.users += 1
        try:
            yield segments
        finally:
            with self._lock:
                for seg in segments.values():
                    seg.users -= 1
                self._idle.notify_all()

    def copy(self, moves: Sequence[Move]) -> None:
        """Apply moves in order with memmove semantics. See ``SegmentMemory.copy``.

        Every move is validated, and the staging buffer allocated, before the first byte
        moves, so a bad plan changes nothing. Cost: one ``memmove`` per move (per chunk of
        an overlapping move), GIL released; from ``PARALLEL_MIN_BYTES`` up, split into
        pieces that ``copy_threads`` threads copy at once (``kvbroker.memory.parallel``);
        overlapping moves closer than ``DIRECT_CHUNK_MIN_BYTES`` copy twice (through the
        staging buffer).

        Raises:
            CopyError: see ``kvbroker.memory.backend.CopyError``.
        """
        with self._lock:
            sizes = {sid: seg.info.nbytes for sid, seg in self._segments.items()}
            checked = [check_move(move, sizes) for move in moves]
        involved = {extent.segment_id for pair in checked for extent in pair}
        need = staging_needed(checked, direct_min=self.DIRECT_CHUNK_MIN_BYTES, staging=self.STAGING_BYTES)
        with self._using(involved) as segments:
            addresses = {sid: seg.address for sid, seg in segments.items()}
            try:
                staging = shm.map_anonymous(need) if need else None
            except OSError as err:
                raise CopyError(0, err) from err
            if staging is not None:
                addresses[STAGING] = staging

            def copy_range(source: Place, destination: Place, nbytes: int) -> None:
                self._copier.copy(
                    self._copy_range,
                    addresses[destination.segment_id] + destination.offset,
                    addresses[source.segment_id] + source.offset,
                    nbytes,
                )

            try:
                run_moves(checked, copy_range, direct_min=self.DIRECT_CHUNK_MIN_BYTES, staging=self.STAGING_BYTES)
            finally:
                if staging is not None:
                    shm.unmap(staging, need)

    def _copy_range(self, destination: int, source: int, nbytes: int) -> None:
        """Copy ``nbytes`` between two addresses that do not overlap.

        The one primitive every byte of a ``copy`` goes through; fault-injection tests
        override it to fail part-way.
        """
        ctypes.memmove(destination, source, nbytes)

    def zero(self, segment_id: int, offset: int, nbytes: int) -> None:
        """Fill a byte range of a segment with zeros. See ``SegmentMemory.zero``.

        ``ctypes.memset`` on the server's mapping, GIL released (a ``CFUNCTYPE`` foreign
        function), so other threads and the event loop run meanwhile. The pages are
        already faulted in, so this is memset bandwidth: 20 to 25 ms per GiB (16 us per
        MiB) on a 2-vCPU VM, a quarter of a memmove of the same size
        (``tests/memory/measure_zero.py``).
        """
        with self._using((segment_id,)) as segments:
            seg = segments[segment_id]
            check_range(segment_id, seg.info.nbytes, offset, nbytes)
            if nbytes:
                self._memset(seg.address + offset, nbytes)

    def _memset(self, address: int, nbytes: int) -> None:
        """Zero ``nbytes`` at ``address`` (a seam: tests override it to hold a zero in flight)."""
        ctypes.memset(address, 0, nbytes)

    def read_into(self, segment_id: int, offset: int, out: Any) -> None:
        """Copy bytes of a segment into ``out`` (``ByteAccess``): one memmove, GIL released."""
        with self._using((segment_id,)) as segments:
            seg = segments[segment_id]
            check_range(segment_id, seg.info.nbytes, offset, out.nbytes)
            if out.nbytes:
                ctypes.memmove(out.ctypes.data, seg.address + offset, out.nbytes)

    def write_from(self, segment_id: int, offset: int, data: Any) -> None:
        """Copy ``data`` into a segment (``ByteAccess``), GIL released.

        Into a prefaulted segment: one ``memmove`` on the server's mapping. Into one
        created without prefault (a restore's): ``pwrite`` through the object's file, so
        that a page is neither zeroed first (tmpfs skips that for a page a write covers
        whole) nor mapped into the server. Measured here for 256 MiB: memmove 25-28 ms
        into mapped pages, 125 ms into unmapped ones; pwrite 68 ms into unmapped pages,
        78-104 ms into mapped ones.

        Raises ``OSError`` (``ESTALE``) if the name no longer leads to the segment.
        """
        with self._using((segment_id,)) as segments:
            seg = segments[segment_id]
            check_range(segment_id, seg.info.nbytes, offset, data.nbytes)
            if not data.nbytes:
                return
            if seg.prefaulted:
                ctypes.memmove(seg.address + offset, data.ctypes.data, data.nbytes)
                return
            view = memoryview(data).cast("B")
            fd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_ino != seg.handle.st_ino:
                    raise OSError(errno.ESTALE, "the segment's name leads to another object", seg.path)
                while view.nbytes:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
            finally:
                os.close(fd)

    def _get(self, segment_id: int) -> _Segment:
        try:
            return self._segments[segment_id]
        except KeyError:
            raise KeyError(f"segment {segment_id} does not exist on the host device") from None


_SHM_ADVICE = "give the broker a larger /dev/shm (docker --shm-size, a Memory emptyDir in Kubernetes)"
_NOFILE_ADVICE = (
    "the process is out of file descriptors (it holds none per segment: gRPC connections "
    "and clients are the usual consumers); raise the limit with `ulimit -n` or LimitNOFILE="
)
_MAPS_ADVICE = (
    "the process has no room for another memory mapping (one per segment); raise "
    "`sysctl vm.max_map_count` or the address-space limit (`ulimit -v`)"
)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
