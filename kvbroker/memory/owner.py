"""Who owns a host shm object, and removing the objects of dead owners.

Each ``HostMemory`` names its objects ``kvb-<pid>-<instance_id>-<segment>-<generation>``;
``<pid>-<instance_id>`` is the *owner tag*. For its whole life the instance holds an
exclusive ``flock`` on the lock file ``kvb-<owner tag>.lock`` in the same directory. The
kernel drops the lock when the process dies, however it dies (SIGKILL included), and
``flock`` works between any processes that open the same file, whatever PID namespace
they run in.

So an owner is dead exactly when its lock file exists and someone else can lock it. A pid
proves nothing: two daemons in two PID namespaces sharing one ``/dev/shm`` see each other's
pids as dead (or as some unrelated live process), and the pid check that was used before
removed a live daemon's segments. Objects whose owner has no lock file were left by a
broker version without lock files: they are never removed automatically, only reported
once, with the command that removes them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import stat

from kvbroker.wire import SHM_NAME_PATTERN

logger = logging.getLogger(__name__)

#: A segment object's name: owner tag (pid, instance id) then segment id and generation.
#: The instance id may contain dashes; segment id and generation are the last two numbers.
OBJECT_NAME = re.compile(r"kvb-(\d+-.+)-(\d+)-(\d+)")
#: A lock file's name; the owner tag is group 1.
LOCK_NAME = re.compile(r"kvb-(\d+-.+)\.lock")

_OPEN_LOCK_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_warned: set[str] = set()


def lock_name(owner: str) -> str:
    return f"kvb-{owner}.lock"


class OwnerLock:
    """The lock file that says "owner ``owner`` is alive" while this object is open.

    The file is made complete and locked under a private temporary name, then hard-linked
    into place, so no other process ever sees the lock file unlocked (a clean-up that
    looked in that moment would take the new owner for dead). Cost: one descriptor for the
    instance's life; a few syscalls to acquire and release.
    """

    def __init__(self, shm_dir: str, owner: str) -> None:
        name = lock_name(owner)
        if not SHM_NAME_PATTERN.fullmatch(name) or not LOCK_NAME.fullmatch(name):
            raise ValueError(f"owner tag {owner!r} makes an invalid lock file name {name!r}")
        self.path = os.path.join(shm_dir, name)
        self._fd: int | None = self._acquire(shm_dir, owner)

    def _acquire(self, shm_dir: str, owner: str) -> int:
        for _attempt in range(2):
            tmp = os.path.join(shm_dir, f".kvb-lock-{secrets.token_hex(8)}")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # exact mode whatever the umask
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new private inode: cannot block
                os.link(tmp, self.path)
                return fd
            except FileExistsError:
                os.close(fd)
                # The same tag: a dead predecessor (same pid and id after a restart) is
                # reaped and the link retried; a live one is a configuration error.
                if remove_owner_objects(shm_dir, owner) is None:
                    raise FileExistsError(
                        errno.EEXIST,
                        f"broker instance {owner!r} is already running on this shm directory "
                        "(its lock file is held)",
                        self.path,
                    ) from None
            except BaseException:
                os.close(fd)
                raise
            finally:
                _unlink_quietly(tmp)
        raise FileExistsError(errno.EEXIST, "could not create the instance's lock file", self.path)

    def release(self) -> None:
        """Remove the lock file and drop the lock. Idempotent. Call it only after every
        object of the owner is unlinked, or they would look like an old version's."""
        if self._fd is None:
            return
        try:
            st = os.fstat(self._fd)
            if _same_file(self.path, st):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _owner_objects(shm_dir: str, owner: str) -> list[str]:
    names = []
    for name in os.listdir(shm_dir):
        parts = OBJECT_NAME.fullmatch(name)
        if parts is not None and parts[1] == owner and SHM_NAME_PATTERN.fullmatch(name):
            names.append(name)
    return sorted(names)


def remove_owner_objects(shm_dir: str, owner: str) -> list[str] | None:
    """If ``owner`` is dead, remove its objects and its lock file; return the object names.

    Returns None, and removes nothing, when the owner is alive (its lock is held), has no
    lock file (an old version's objects, or another clean-up got there first), or its lock
    file is not ours to open. The lock is held while removing, so a concurrent clean-up
    backs off; the owner being dead, no object of its tag can appear meanwhile.
    Cost: one ``listdir`` and one unlink per object.
    """
    path = os.path.join(shm_dir, lock_name(owner))
    try:
        fd = os.open(path, _OPEN_LOCK_FLAGS)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.EACCES, errno.ELOOP, errno.EPERM):
            raise
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # the owner is alive
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _same_file(path, st):
            return None  # reaped and unlinked by another clean-up meanwhile
        removed = []
        for name in _owner_objects(shm_dir, owner):
            object_path = os.path.join(shm_dir, name)
            try:
                if not stat.S_ISREG(os.lstat(object_path).st_mode):
                    continue
                os.unlink(object_path)
            except FileNotFoundError:
                continue
            except PermissionError:
                logger.warning("cannot remove stale shared-memory object %s: permission denied", object_path)
                continue
            logger.info("removed shared-memory object %s of dead broker instance %s", object_path, owner)
            removed.append(name)
        os.unlink(path)  # last: an interrupted clean-up is finished by the next one
        return removed
    finally:
        os.close(fd)


def remove_stale_segments(shm_dir: str = "/dev/shm", *, instance_id: str | None = None) -> list[str]:
    """Remove the objects of every dead broker instance in ``shm_dir``; return their names.

    Dead means: its lock file exists and can be locked (see the module docstring). A live
    instance's objects are never touched, whatever its pid looks like from here. Objects
    with no lock file (left by a broker version without lock files) are kept and reported
    in one warning, once per process, with the command that removes them.
    ``instance_id`` is accepted for callers of the pid-based version and ignored: this
    process's own instances hold their locks, so their objects are kept anyway.

    Cost: one ``listdir``, one open and ``flock`` per lock file, one unlink per object.
    """
    del instance_id
    names = os.listdir(shm_dir)
    owners_with_lock = {m[1] for m in map(LOCK_NAME.fullmatch, names) if m is not None}
    legacy: list[str] = []
    for name in sorted(names):
        parts = OBJECT_NAME.fullmatch(name)
        if parts is not None and parts[1] not in owners_with_lock and SHM_NAME_PATTERN.fullmatch(name):
            legacy.append(name)
    removed: list[str] = []
    for owner in sorted(owners_with_lock):
        removed.extend(remove_owner_objects(shm_dir, owner) or ())
    unwarned = [name for name in legacy if os.path.join(shm_dir, name) not in _warned]
    if unwarned:
        paths = [os.path.join(shm_dir, name) for name in unwarned]
        _warned.update(paths)
        logger.warning(
            "%d shared-memory object(s) in %s have no owner lock file: left by an older "
            "kvbroker, which cannot be told apart from a live one. They are kept. Once no "
            "older broker runs on this host, remove them with: rm -- %s",
            len(paths),
            shm_dir,
            " ".join(paths),
        )
    return removed
