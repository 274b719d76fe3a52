"""Which shm objects are stale: owner lock files, between real processes (issue 9.4).

Two brokers in two PID namespaces that share one ``/dev/shm`` see each other's pids as
dead; the pid-based clean-up removed a live broker's segments. A test cannot create PID
namespaces, so it builds the same situation by naming: an object whose pid is not running
while its owner, another live process, holds the owner's lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kvbroker.core.types import SegmentInfo
from kvbroker.memory.host import HostMemory
from kvbroker.memory.owner import remove_stale_segments

REPO_ROOT = Path(__file__).resolve().parents[2]

OWNER_SCRIPT = r"""
import sys
from kvbroker.core.types import SegmentInfo
from kvbroker.memory.host import HostMemory
memory = HostMemory(sys.argv[2], shm_dir=sys.argv[1])
for sid in (1, 2):
    memory.create(SegmentInfo(sid, 1, "p", "host", 8192))
    print(memory.handle(sid).shm_name, flush=True)
print("ready", flush=True)
sys.stdin.read()
"""

LOCK_HOLDER_SCRIPT = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def python(script: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "client")]))
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def lines_until(proc: subprocess.Popen[str], last: str) -> list[str]:
    assert proc.stdout is not None
    lines = []
    while (line := proc.stdout.readline().strip()) != last:
        assert line, f"child exited with {proc.wait(timeout=30)} before printing {last!r}"
        lines.append(line)
    return lines


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def dead_pid() -> int:
    """A pid no process has now: the old clean-up took objects carrying it for stale."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(done.pid, 0)  # exactly the old code's liveness test
    return done.pid


def test_the_lock_file_is_private_held_for_life_and_removed_at_close(shm_dir):
    memory = HostMemory("owner", shm_dir=shm_dir)
    path = memory.lock_path
    assert os.path.basename(path) == f"kvb-{os.getpid()}-owner.lock"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, even against this process
    finally:
        os.close(fd)
    assert [n for n in os.listdir(shm_dir) if not n.startswith("kvb-")] == []  # no temp file left
    memory.close()
    memory.close()
    assert os.listdir(shm_dir) == []


def test_one_instance_id_cannot_run_twice_on_one_directory(shm_dir):
    with HostMemory("twice", shm_dir=shm_dir) as first:
        with pytest.raises(FileExistsError, match="already running"):
            HostMemory("twice", shm_dir=shm_dir)
        first.create(SegmentInfo(1, 1, "p", "host", 4096))  # the refused one broke nothing
        assert os.path.exists(first.lock_path)
    with HostMemory("twice", shm_dir=shm_dir):
        pass


def test_a_live_owner_in_another_process_is_kept_and_a_killed_one_removed(shm_dir):
    first = python(OWNER_SCRIPT, shm_dir, "first")
    try:
        first_objects = lines_until(first, "ready")
        assert len(first_objects) == 2

        with HostMemory("second", shm_dir=shm_dir) as second:  # its start-up clean-up
            assert second.stale_removed == []
            assert all(os.path.exists(os.path.join(shm_dir, n)) for n in first_objects)
            second.create(SegmentInfo(7, 1, "p", "host", 4096))
            second_object = os.path.join(shm_dir, second.handle(7).shm_name)

            first.send_signal(signal.SIGKILL)
            assert first.wait(timeout=30) == -signal.SIGKILL

            with HostMemory("third", shm_dir=shm_dir) as third:
                assert sorted(third.stale_removed) == sorted(first_objects)
            assert not any(os.path.exists(os.path.join(shm_dir, n)) for n in first_objects)
            assert not os.path.exists(os.path.join(shm_dir, f"kvb-{first.pid}-first.lock"))
            assert os.path.exists(second_object) and os.path.exists(second.lock_path)
    finally:
        stop(first)


def test_a_pid_that_looks_dead_does_not_make_a_live_owners_objects_stale(shm_dir):
    pid = dead_pid()  # what a broker in another PID namespace looks like from here
    names = [f"kvb-{pid}-ghost-1-1", f"kvb-{pid}-ghost-2-5"]
    for name in names:
        Path(shm_dir, name).write_bytes(b"live data")
    lock = Path(shm_dir, f"kvb-{pid}-ghost.lock")
    lock.write_bytes(b"")
    holder = python(LOCK_HOLDER_SCRIPT, str(lock))  # the live owner, by its lock
    try:
        lines_until(holder, "locked")
        assert remove_stale_segments(shm_dir) == []
        with HostMemory("onlooker", shm_dir=shm_dir) as onlooker:
            assert onlooker.stale_removed == []
        assert all(Path(shm_dir, n).read_bytes() == b"live data" for n in names) and lock.exists()

        stop(holder)  # the owner dies: the kernel drops its lock
        assert sorted(remove_stale_segments(shm_dir, instance_id="ignored")) == sorted(names)
        assert os.listdir(shm_dir) == []
    finally:
        stop(holder)


def test_objects_without_a_lock_file_are_kept_and_reported_once(shm_dir, caplog):
    pid = dead_pid()
    old = [f"kvb-{pid}-oldbroker-1-1", f"kvb-{pid}-oldbroker-2-1"]
    for name in old:
        Path(shm_dir, name).write_bytes(b"")
    caplog.set_level(logging.WARNING, logger="kvbroker.memory.owner")

    assert remove_stale_segments(shm_dir) == []
    assert remove_stale_segments(shm_dir) == []

    assert sorted(os.listdir(shm_dir)) == sorted(old)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "older kvbroker" in warnings[0]
    assert "rm -- " + " ".join(os.path.join(shm_dir, n) for n in sorted(old)) in warnings[0]


def test_a_dead_owner_is_removed_whole_but_nothing_else(shm_dir):
    pid = dead_pid()
    Path(shm_dir, f"kvb-{pid}-gone.lock").write_bytes(b"")  # unlocked: its owner died
    dead_objects = [f"kvb-{pid}-gone-1-1", f"kvb-{pid}-gone-12-3"]
    for name in dead_objects:
        Path(shm_dir, name).write_bytes(b"")
    Path(shm_dir, f"kvb-{pid}-gone-3-1").mkdir()  # not a regular file: kept
    Path(shm_dir, f"kvb-{pid}-gone-with-dashes-1-1").write_bytes(b"")  # another owner, no lock
    Path(shm_dir, "kvb-notapid-x-1-1").write_bytes(b"")
    Path(shm_dir, "unrelated").write_bytes(b"")
    Path(shm_dir, f"kvb-{pid}-lonely.lock").write_bytes(b"")  # a dead owner with no objects

    assert sorted(remove_stale_segments(shm_dir)) == sorted(dead_objects)
    assert sorted(os.listdir(shm_dir)) == sorted(
        [f"kvb-{pid}-gone-3-1", f"kvb-{pid}-gone-with-dashes-1-1", "kvb-notapid-x-1-1", "unrelated"]
    )
    os.rmdir(os.path.join(shm_dir, f"kvb-{pid}-gone-3-1"))
