"""The real daemon of the client tests: the shared launcher (``tests/support/daemon.py``)
serving the host device on a Unix socket only, with one 16 MiB segment that holds every
cache of these tests (so a freed place is the next allocation's place)."""

from __future__ import annotations

from pathlib import Path

from tests.support.daemon import Daemon, start_daemon as _start
from tests.support.wait import wait_until

__all__ = ["CONFIG", "Daemon", "MiB", "start_daemon", "wait_until"]

MiB = 1 << 20

CONFIG = """
[devices]
host_capacity = "64MiB"

[[pools]]
name = "default"
segment_bytes = "16MiB"
block_bytes = "1MiB"
"""


def start_daemon(directory: Path, *args: str, socket_path: Path | None = None) -> Daemon:
    """Start a daemon with ``CONFIG`` and ``args`` (on ``socket_path`` when given: a
    restart on the same socket) and return once it serves."""
    directory.mkdir(parents=True, exist_ok=True)
    return _start(directory, *args, config=CONFIG, unix_socket=socket_path, tcp=False, grace_seconds=1.0)
