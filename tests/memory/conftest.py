"""A second, unrelated Python process that maps a broker handle and serves reads/writes.

Zero-copy is only proven across real processes: the child gets the serialized
``kvbroker.v1.Handle`` on its command line, maps it with ``SegmentMapper`` (exactly what a
model worker does), and then reads or writes its view on command, while the test process
changes the same bytes through the backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD_SCRIPT = r"""
import sys
import torch
from kvbroker.v1 import broker_pb2
from kvbroker_client.mapping import SegmentMapper

handle = broker_pb2.Handle.FromString(bytes.fromhex(sys.argv[1]))
mapper = SegmentMapper()
view = mapper.view(handle)
again = mapper.view(handle)
assert again.data_ptr() == view.data_ptr() and len(mapper) == 1, "segment mapped twice"
print("ready", flush=True)
for line in sys.stdin:
    command, *args = line.split()
    if command == "read":
        offset, nbytes = int(args[0]), int(args[1])
        print(bytes(view[offset : offset + nbytes].cpu().tolist()).hex(), flush=True)
    elif command == "write":
        offset, data = int(args[0]), bytes.fromhex(args[1])
        view[offset : offset + len(data)].copy_(torch.tensor(list(data), dtype=torch.uint8))
        if view.is_cuda:
            torch.cuda.synchronize()
        print("ok", flush=True)
    else:
        break
"""


class MappedChild:
    """A child process holding a view of one handle's byte range."""

    def __init__(self, handle_bytes: bytes) -> None:
        env = dict(os.environ)
        extra = [str(REPO_ROOT), str(REPO_ROOT / "client")]
        env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in [env.get("PYTHONPATH")] if p])
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_SCRIPT, handle_bytes.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self.pid = self._proc.pid
        self._expect("ready")

    def _ask(self, line: str) -> str:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def _reply(self) -> str:
        assert self._proc.stdout is not None
        reply = self._proc.stdout.readline().strip()
        if not reply:
            self._proc.wait(timeout=30)
            self._stderr.seek(0)
            raise AssertionError(f"child exited with {self._proc.returncode}:\n{self._stderr.read()}")
        return reply

    def _expect(self, wanted: str) -> None:
        reply = self._reply()
        assert reply == wanted, reply

    def read(self, offset: int, nbytes: int) -> bytes:
        return bytes.fromhex(self._ask(f"read {offset} {nbytes}"))

    def write(self, offset: int, data: bytes) -> None:
        assert self._ask(f"write {offset} {data.hex()}") == "ok"

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.write("quit\n")
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        assert self._proc.stdout is not None
        self._proc.stdout.close()
        self._stderr.close()


@pytest.fixture
def map_in_child() -> Iterator[Callable[[bytes], MappedChild]]:
    """Start children that map a serialized handle; they are stopped at teardown."""
    children: list[MappedChild] = []

    def start(handle_bytes: bytes) -> MappedChild:
        child = MappedChild(handle_bytes)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A private directory on the /dev/shm tmpfs: real shm semantics, and no clean-up of
    another test run (or of another broker on this machine) ever sees its objects."""
    directory = tempfile.mkdtemp(prefix="kvbtest-", dir="/dev/shm")
    try:
        yield directory
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
