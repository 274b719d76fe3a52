"""A real daemon per test module (tests/support/daemon.py): a subprocess serving the host
device on 127.0.0.1 and a private Unix socket, stopped by SIGTERM at the end of the
module, which fails unless it exits 0 and leaves no shm object behind."""

from __future__ import annotations

from tests.support.daemon import ROOT, Daemon, daemon_fixture

__all__ = ["CONFIG", "ROOT", "Daemon", "daemon"]

CONFIG = """
[devices]
host_capacity = "256MiB"

[[pools]]
name = "default"
segment_bytes = "64MiB"
block_bytes = "64KiB"

[[pools]]
name = "small"
max_bytes = "16MiB"
segment_bytes = "16MiB"
"""

daemon = daemon_fixture(config=CONFIG, scope="module")
