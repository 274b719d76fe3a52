"""A real daemon per test module: a subprocess on a free port and a private Unix socket,
serving the host device from a private shm namespace prefix, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    process: subprocess.Popen
    address: str  # host:port
    unix_socket: str
    log_path: Path

    @property
    def target(self) -> str:
        return f"unix://{self.unix_socket}"

    def shm_objects(self) -> list[str]:
        """The shm objects this daemon created (named after its pid)."""
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"kvb-{self.process.pid}-"))

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def wait_serving(target: str, process: subprocess.Popen, log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise RuntimeError(f"daemon not serving after {timeout} s:\n{log_path.read_text()}")


def _die_with_the_test_run() -> None:
    """In the daemon's child process: get SIGTERM when the test process dies, so a killed
    or timed-out test run never leaves a daemon (and its /dev/shm objects) behind."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_daemon(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Daemon:
    port = free_port()
    sock = str(tmp_path / "kvb.sock")
    log_path = tmp_path / "daemon.log"
    cmd = [
        sys.executable, "-m", "kvbroker", "serve", "--devices", "host",
        "--listen", f"127.0.0.1:{port}", "--unix-socket", sock, "--grace-seconds", "2",
        "--metrics-listen", "", *args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, preexec_fn=_die_with_the_test_run,
        )
    daemon = Daemon(process, f"127.0.0.1:{port}", sock, log_path)
    try:
        wait_serving(daemon.target, process, log_path)
    except BaseException:
        daemon.stop()
        raise
    return daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("daemon")
    config = tmp / "kvbroker.toml"
    config.write_text(
        """
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
    )
    daemon = start_daemon(tmp, "--config", str(config))
    yield daemon
    assert daemon.stop() == 0, daemon.log()
    assert daemon.shm_objects() == [], "shm objects left behind"
