"""A real kvbroker daemon for client tests: a subprocess serving the host device on a
private Unix socket (no TCP, no metrics), stopped by SIGTERM, killed with the test run.

The client tests keep their own launcher rather than borrowing the end-to-end suite's,
so that they depend on the daemon's command line only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

#: 64 MiB of host memory; one 16 MiB segment holds every cache of these tests, so a
#: freed place is the next allocation's place.
CONFIG = """
[devices]
host_capacity = "64MiB"

[[pools]]
name = "default"
segment_bytes = "16MiB"
block_bytes = "1MiB"
"""


@dataclass
class Daemon:
    process: subprocess.Popen
    socket_path: Path
    log_path: Path

    @property
    def target(self) -> str:
        return f"unix://{self.socket_path}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def wait_until(predicate: Callable[[], object], timeout: float, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.01)


def _die_with_the_test_run() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_daemon(directory: Path, *args: str, socket_path: Path | None = None) -> Daemon:
    """Start a daemon with ``CONFIG`` and ``args`` and wait until it serves (health check)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "kvbroker.toml"
    config.write_text(CONFIG)
    socket_path = socket_path or directory / "kvb.sock"
    log_path = directory / "daemon.log"
    command = [
        sys.executable, "-m", "kvbroker", "serve", "--devices", "host", "--config", str(config),
        "--listen", "", "--unix-socket", str(socket_path), "--metrics-listen", "",
        "--grace-seconds", "1", *args,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
            preexec_fn=_die_with_the_test_run,
        )  # fmt: skip
    daemon = Daemon(process, socket_path, log_path)
    try:
        _wait_serving(daemon)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _wait_serving(daemon: Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(daemon.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if daemon.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {daemon.process.returncode}:\n{daemon.log()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.05)
    raise RuntimeError(f"daemon not serving after {timeout} s:\n{daemon.log()}")
