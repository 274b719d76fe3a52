"""Real daemons for the safety suites (issue 9: no tenant sees or touches another's memory).

Every test here talks to a real ``kvbroker serve`` subprocess over 127.0.0.1 or a private
Unix socket, with real client processes and real POSIX shm objects: nothing is mocked.

Daemons are started by the one launcher, ``tests/support/daemon.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import start_daemon as _start

@dataclass
class SafetyDaemon:
    """A running daemon plus what the safety checks need to look at from outside."""

    inner: object  # tests.e2e.conftest.Daemon (or its successor)
    shm_dir: str
    tmp_path: Path

    @property
    def target(self) -> str:
        return self.inner.target

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def pid(self) -> int:
        return self.inner.process.pid

    @property
    def process(self):
        return self.inner.process

    def shm_objects(self) -> list[str]:
        """The segment objects this daemon created and has not unlinked
        (``kvb-<pid>-<instance>-<segment>-<generation>``; other files of the daemon, such
        as a lock file, are not segments)."""
        pattern = re.compile(rf"kvb-{self.pid}-.+-\d+-\d+")
        return sorted(n for n in self._listing() if pattern.fullmatch(n))

    def shm_files(self) -> list[str]:
        """Every file of this daemon in its shm dir, segments or not."""
        prefix = f"kvb-{self.pid}-"
        return sorted(n for n in self._listing() if n.startswith(prefix))

    def _listing(self) -> list[str]:
        # The launcher removes a private directory at stop once it is empty.
        try:
            return os.listdir(self.shm_dir)
        except FileNotFoundError:
            return []

    def log(self) -> str:
        return self.inner.log()

    def log_size(self) -> int:
        return len(self.inner.log())

    def alive(self) -> bool:
        return self.inner.process.poll() is None

    def stop(self) -> int:
        return self.inner.stop()


def start_safety_daemon(tmp_path: Path, config: str | None = None, *flags: str) -> SafetyDaemon:
    """Start a daemon serving the host device with the TOML ``config`` and extra flags."""
    args = list(flags)
    if config is not None:
        path = tmp_path / "kvbroker.toml"
        path.write_text(config)
        args = ["--config", str(path), *args]
    # The launcher's private shm directory (tests/support/daemon.py): the client maps
    # from the directory each handle names, and the objects counted are this daemon's.
    inner = _start(tmp_path, *args)
    return SafetyDaemon(inner, inner.shm_dir, tmp_path)


def _stop_clean(daemon: SafetyDaemon) -> None:
    """Stop the daemon; it must exit 0 and leave no shm object behind."""
    code = daemon.stop()
    assert code == 0, daemon.log()[-4000:]
    assert daemon.shm_files() == [], "the daemon left files in its shm dir behind"


@pytest.fixture
def start_daemon(tmp_path) -> Iterator[Callable[..., SafetyDaemon]]:
    """A factory: ``start_daemon(config_toml, *flags)``; every daemon it started is
    stopped at the end of the test and must exit cleanly without leftovers."""
    started: list[SafetyDaemon] = []

    def start(config: str | None = None, *flags: str) -> SafetyDaemon:
        sub = tmp_path / f"daemon{len(started)}"
        sub.mkdir()
        daemon = start_safety_daemon(sub, config, *flags)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        _stop_clean(daemon)
