"""Descriptors and mappings (issue 9.6): a host segment holds no file descriptor, and
running out of descriptors or mappings is a clear ``ResourceExhausted``.

The limits are lowered with ``setrlimit`` in a child process, so this test run keeps its
own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kvbroker.core.types import SegmentInfo
from kvbroker.memory.host import HostMemory

REPO_ROOT = Path(__file__).resolve().parents[2]

PRELUDE = r"""
import errno, os, resource, sys
from kvbroker.core.errors import ResourceExhausted
from kvbroker.core.types import SegmentInfo
from kvbroker.memory.host import HostMemory
shm_dir = sys.argv[1]
def info(sid, nbytes=4096):
    return SegmentInfo(sid, 1, "p", "host", nbytes)
def open_fds():
    return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir uses
"""

NOFILE_SCRIPT = PRELUDE + r"""
memory = HostMemory("nofile", shm_dir=shm_dir)
base = open_fds()
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (base + 8, hard))
for sid in range(64):  # a descriptor per segment would run out after 8
    memory.create(info(sid))
assert open_fds() == base, (open_fds(), base)
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError as err:
    assert err.errno == errno.EMFILE, err
try:
    memory.create(info(100))
except ResourceExhausted as err:
    assert err.satisfiable is False
    print("refused:", err)
for fd in held:
    os.close(fd)
assert not [n for n in os.listdir(shm_dir) if n.endswith("-100-1")], "a failed create left its object"
memory.create(info(100))
memory.close()
print("ok")
"""

MAPS_SCRIPT = PRELUDE + r"""
memory = HostMemory("maps", shm_dir=shm_dir)
with open("/proc/self/status") as status:
    vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
_soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, ((vm_kib + 64 * 1024) * 1024, hard))
try:
    memory.create(info(1, 512 * 1024 * 1024))  # fits in the tmpfs, not in the address space
except ResourceExhausted as err:
    print("refused:", err)
assert memory.segment_ids() == [] and [n for n in os.listdir(shm_dir) if n.endswith("-1-1")] == []
memory.create(info(2))
memory.close()
print("ok")
"""


def run_child(script: str, shm_dir: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "client")]))
    done = subprocess.run([sys.executable, "-c", script, shm_dir], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "ok", done.stdout
    return done.stdout


def test_segments_hold_no_file_descriptor(shm_dir):
    fd_dir = "/proc/self/fd"
    with HostMemory("fds", shm_dir=shm_dir) as memory:
        before = len(os.listdir(fd_dir))
        for sid in range(20):
            memory.create(SegmentInfo(sid, 1, "p", "host", 4096))
        assert len(os.listdir(fd_dir)) == before


def test_no_descriptor_left_is_resource_exhausted_naming_ulimit(shm_dir):
    out = run_child(NOFILE_SCRIPT, shm_dir)
    assert "refused:" in out and "Too many open files" in out
    assert "(64 segments live)" in out and "ulimit -n" in out


def test_no_mapping_left_is_resource_exhausted_naming_max_map_count(shm_dir):
    out = run_child(MAPS_SCRIPT, shm_dir)
    assert "refused:" in out and "Cannot allocate memory" in out
    assert "vm.max_map_count" in out and "ulimit -v" in out
