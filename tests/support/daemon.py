"""One way to run a real kvbroker daemon for tests and benchmarks.

``python -m kvbroker serve`` runs as a child process, exactly as an operator starts it,
and this module owns everything around that:

- **Addresses nobody else uses.** gRPC listens on ``127.0.0.1:0``: the kernel picks a
  free port, so parallel runs never race for one, and the port is read back from the
  daemon's start line (``serving on tcp 127.0.0.1:PORT``, kvbroker/daemon.py), else from
  the listening sockets the process owns (``/proc``). The Unix socket lives in a fresh
  directory under ``/tmp`` (short: a socket path has at most 107 bytes, and pytest's
  ``tmp_path`` can exceed that). ``/metrics`` (``metrics=True``) cannot be read back, so
  it gets a port that was free a moment ago, and a start that fails because another
  process took it in between is retried on a new one.
- **A clean environment.** ``KVBROKER_*`` and ``OTEL_*`` variables of the caller's shell
  do not leak into the daemon (a developer's ``OTEL_EXPORTER_OTLP_ENDPOINT`` would
  otherwise make every test daemon export); ``env=`` sets what a test wants. The
  repository and ``client/`` are put on ``PYTHONPATH``.
- **It dies with the run.** ``PR_SET_PDEATHSIG`` makes the kernel send SIGTERM to the
  daemon when the process that started it dies (the signal follows the *thread* that
  forked, so start daemons from the main thread), so a killed or timed-out test run never
  leaves a daemon and its ``/dev/shm`` objects behind.
- **Ready means serving.** The start returns once ``grpc.health.v1.Health/Check`` says
  SERVING on both the Unix socket and the TCP port, polled against a deadline; a daemon
  that exits first fails the start with its exit code and the tail of its log.
- **Stopped by PID.** SIGTERM (the daemon's graceful path, kvbroker/daemon.py), then
  SIGKILL after a deadline; the exit code is returned (negative when killed).
- **A log to read.** stdout and stderr go to ``<workdir>/daemon.log``; errors raised here
  end with its tail, and tests/conftest.py adds the tail of each daemon a failing test
  used to its report.

Host segments: by default (``DEFAULT_SHM = PRIVATE_SHM``) each daemon gets a fresh
directory on the ``/dev/shm`` tmpfs (``--shm-dir``), removed at stop, so a run's objects
never mix with another run's or a developer's daemon, and every test exercises the
``--shm-dir`` path operators use (the handle names its directory and the client maps
from it: client/kvbroker_client/handles.py, issue 10.1). ``shm_dir=None`` gives the
daemon its own default, ``/dev/shm``, where its objects are named ``kvb-<daemon
pid>-...`` so ``Daemon.shm_objects()`` still finds exactly this daemon's.

Usage::

    with running_daemon(config=TOML) as daemon:          # tests and benchmarks
        stub = CacheBrokerStub(grpc.insecure_channel(daemon.target))
    daemon = daemon_fixture(config=TOML, scope="module")  # a pytest fixture, in a test module

Benchmarks import this module from the checkout (they put the repository root on
``sys.path``; benchmarks/harness.py), so it must not import pytest at module level.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.wait import WaitTimeout, wait_until

ROOT = Path(__file__).resolve().parents[2]

#: ``shm_dir=PRIVATE_SHM``: a fresh directory under /dev/shm for this daemon's segments.
PRIVATE_SHM = "private"
_PRIVATE_PREFIX = "kvb-test-"
#: ``shm_dir`` when a caller gives none: a private directory (see the module docstring).
DEFAULT_SHM: str | None = PRIVATE_SHM
#: Seconds a start may take before it fails (a cold interpreter imports torch: seconds).
READY_TIMEOUT_S = 60.0
#: Seconds between SIGTERM and SIGKILL.
STOP_TIMEOUT_S = 20.0
#: How many times a start is retried when the metrics port was taken meanwhile.
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 40

_START_LINE = re.compile(r"\btcp(?:\+m?tls)? (\S+?):(\d+)\b")
_PORT_TAKEN = ("cannot serve metrics on", "cannot listen on", "address already in use", "Address already in use")
#: Fast reconnects while the daemon comes up: gRPC's default backoff (1 s, growing) would
#: make readiness wait for the channel instead of the daemon.
_PROBE_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]

# Resolved in the parent: the child between fork and exec should do as little as possible.
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class DaemonError(RuntimeError):
    """The daemon did not start, did not stop cleanly, or left something behind; the
    message ends with the tail of its log."""


@dataclass
class Daemon:
    """A running (or stopped) daemon started by ``start_daemon``."""

    process: subprocess.Popen[bytes]
    command: list[str]
    workdir: Path
    log_path: Path
    unix_socket: str
    shm_dir: str
    address: str = ""  # 127.0.0.1:PORT once serving
    metrics_url: str | None = None
    ready_seconds: float = float("nan")
    exit_code: int | None = None
    #: This daemon's objects found in its private shm directory when it stopped (that
    #: directory is removed then, whatever it held: a killed daemon leaves its segments).
    left_behind: list[str] = field(default_factory=list)
    _cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        """The gRPC target of the Unix socket, what a co-located worker uses."""
        return f"unix://{self.unix_socket}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "".join(self.log().splitlines(keepends=True)[-lines:]) or "(empty log)\n"

    def shm_objects(self) -> list[str]:
        """This daemon's host segment objects (``kvb-<pid>-...``) still in its shm_dir."""
        try:
            names = os.listdir(self.shm_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(f"kvb-{self.pid}-"))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code (``-9``
        when it had to be killed). Idempotent; also removes the socket directory and, if
        empty, a private shm directory."""
        if self.exit_code is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.exit_code = self.process.wait()
                with open(self.log_path, "a") as log:
                    log.write(f"[tests.support.daemon] no exit {timeout:g} s after SIGTERM: killed\n")
            while self._cleanup:
                self._cleanup.pop()()
        return self.exit_code

    def check_clean_exit(self) -> None:
        """Stop if needed; raise ``DaemonError`` unless the exit code was 0 and no host
        segment object of this daemon is left."""
        code = self.stop()
        if code != 0:
            raise DaemonError(f"the daemon (pid {self.pid}) exited with {code}; log tail:\n{self.log_tail()}")
        left = self.left_behind or self.shm_objects()
        if left:
            for name in left:  # garbage now; removed so that one failure does not pile up
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.shm_dir, name))
            raise DaemonError(f"the daemon left shm objects behind in {self.shm_dir}: {left}")

    def describe(self) -> str:
        state = "running" if self.exit_code is None and self.alive else f"exit code {self.process.returncode}"
        return f"kvbroker daemon pid {self.pid} ({state}), log {self.log_path}"


#: Every daemon this process started, in order (tests/conftest.py reports on them).
STARTED: list[Daemon] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot be
    asked which port they bound; the daemon's gRPC port is bound as port 0 instead)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(env: Mapping[str, str] | None = None, *, inherit_settings: bool = False) -> dict[str, str]:
    """The environment of a daemon (or any child that imports the repo): the caller's,
    without ``KVBROKER_*``/``OTEL_*`` unless ``inherit_settings``, with the repository and
    client/ on ``PYTHONPATH``, then ``env``."""
    out = {
        k: v for k, v in os.environ.items() if inherit_settings or not k.startswith(("KVBROKER_", "OTEL_"))
    }
    paths = [str(ROOT), str(ROOT / "client")]
    if out.get("PYTHONPATH"):
        paths.append(out["PYTHONPATH"])
    out["PYTHONPATH"] = os.pathsep.join(paths)
    out.update(env or {})
    return out


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """The child's pre-exec step: SIGTERM when the parent dies (``PR_SET_PDEATHSIG``; it
    survives the exec). If the parent died before the prctl, the child ends at once."""

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state on sockets that process ``pid`` owns (Linux /proc)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _health(target: str, timeout: float) -> int:
    """One health check of ``target`` (waits for the connection up to ``timeout``);
    returns the status, or -1 when the call failed."""
    with grpc.insecure_channel(target, options=_PROBE_OPTIONS) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True
            )
        except grpc.RpcError:
            return -1
    return reply.status


def wait_serving(target: str, process: subprocess.Popen, log_path: Path, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until ``target`` answers health checks with SERVING. Raises ``DaemonError``
    (with the log's tail) when ``process`` exits first or ``timeout`` passes."""

    def serving() -> bool:
        if process.poll() is not None:
            raise DaemonError(f"the daemon exited with {process.returncode} before serving; log tail:\n{_tail(log_path)}")
        return _health(target, timeout=0.5) == health_pb2.HealthCheckResponse.SERVING

    try:
        wait_until(serving, timeout, f"{target} reports SERVING")
    except WaitTimeout as err:
        raise DaemonError(f"{err}; log tail:\n{_tail(log_path)}") from None


def _tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)\n"
    return "".join(text.splitlines(keepends=True)[-lines:]) or "(empty log)\n"


def _tcp_address(daemon: Daemon, metrics_port: int | None, timeout: float) -> str:
    """The daemon's gRPC TCP address: from its start line, else from /proc."""

    def found() -> str | None:
        match = _START_LINE.search(daemon.log())
        if match:
            return f"{match.group(1)}:{match.group(2)}"
        ports = _listening_ports(daemon.pid) - {metrics_port}
        return f"127.0.0.1:{ports.pop()}" if len(ports) == 1 else None

    try:
        return wait_until(found, timeout, f"daemon pid {daemon.pid} tells or shows its TCP port")
    except WaitTimeout as err:
        raise DaemonError(f"{err}; log tail:\n{daemon.log_tail()}") from None


def start_daemon(
    workdir: Path | str,
    *args: str,
    config: str | None = None,
    devices: str = "host",
    host_capacity: str | None = None,
    metrics: bool = False,
    shm_dir: str | Path | None = DEFAULT_SHM,
    grace_seconds: float = 2.0,
    env: Mapping[str, str] | None = None,
    inherit_settings: bool = False,
    ready_timeout: float = READY_TIMEOUT_S,
    unix_socket: str | Path | None = None,
    tcp: bool = True,
) -> Daemon:
    """Start ``python -m kvbroker serve`` and return once it serves.

    Args:
        workdir: where the log (``daemon.log``) and the configuration file go; exists.
        args: further ``kvbroker serve`` flags, after the ones set here (they win).
        config: TOML text, written to ``<workdir>/kvbroker.toml`` and passed as
            ``--config``.
        devices: ``--devices`` (``"host"``, ``"cuda"``, ``"auto"``).
        host_capacity: ``--host-capacity`` (``"3GiB"``); default: the config's.
        metrics: serve ``/metrics`` on a free port (``Daemon.metrics_url``); off by default
            (``--metrics-listen ''``).
        shm_dir: ``--shm-dir``; ``PRIVATE_SHM`` (the default, ``DEFAULT_SHM``) for a
            fresh directory under /dev/shm; None for the daemon's default (/dev/shm).
        grace_seconds: ``--grace-seconds`` (in-flight calls at SIGTERM).
        env: extra environment variables (``OTEL_*``, ``KVBROKER_*``).
        inherit_settings: keep the caller's ``KVBROKER_*``/``OTEL_*`` variables.
        ready_timeout: seconds to wait for SERVING.
        unix_socket: the socket's path (a daemon restarted on the same socket); default a
            fresh one in a private directory, removed at stop.
        tcp: serve TCP on 127.0.0.1 (a free port); False: the Unix socket only.

    Raises:
        DaemonError: it exited or did not serve in time (the log's tail is in the message).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_args: list[str] = []
    if config is not None:
        config_path = workdir / "kvbroker.toml"
        config_path.write_text(config)
        config_args = ["--config", str(config_path)]
    last_error: DaemonError | None = None
    for attempt in range(PORT_ATTEMPTS):
        log_path = workdir / ("daemon.log" if attempt == 0 else f"daemon.{attempt}.log")
        try:
            return _start_once(
                workdir, log_path, [*config_args, *args], devices=devices, host_capacity=host_capacity,
                metrics=metrics, shm_dir=shm_dir, grace_seconds=grace_seconds,
                env=child_env(env, inherit_settings=inherit_settings), ready_timeout=ready_timeout,
                unix_socket=unix_socket, tcp=tcp,
            )  # fmt: skip
        except DaemonError as err:
            last_error = err
            if not (metrics and any(word in str(err) for word in _PORT_TAKEN)):
                raise
    assert last_error is not None
    raise last_error


def _start_once(
    workdir: Path, log_path: Path, args: Sequence[str], *, devices: str, host_capacity: str | None,
    metrics: bool, shm_dir: str | Path | None, grace_seconds: float, env: dict[str, str], ready_timeout: float,
    unix_socket: str | Path | None = None, tcp: bool = True,
) -> Daemon:  # fmt: skip
    cleanup: list[Callable[[], None]] = []
    if unix_socket is None:
        sock_dir = tempfile.mkdtemp(prefix="kvb-sock-", dir="/tmp")
        cleanup.append(lambda: shutil.rmtree(sock_dir, ignore_errors=True))
        unix_socket = os.path.join(sock_dir, "kvbroker.sock")
    unix_socket = str(unix_socket)
    metrics_port = free_port() if metrics else None
    flags = [
        "--devices", devices, "--listen", "127.0.0.1:0" if tcp else "", "--unix-socket", unix_socket,
        "--grace-seconds", f"{grace_seconds:g}",
        "--metrics-listen", f"127.0.0.1:{metrics_port}" if metrics_port else "",
    ]  # fmt: skip
    if host_capacity is not None:
        flags += ["--host-capacity", host_capacity]
    resolved_shm = "/dev/shm"
    if shm_dir == PRIVATE_SHM:
        resolved_shm = tempfile.mkdtemp(prefix=_PRIVATE_PREFIX, dir="/dev/shm")
        cleanup.append(lambda: _discard_private_shm(daemon))
        flags += ["--shm-dir", resolved_shm]
    elif shm_dir is not None:
        resolved_shm = str(shm_dir)
        flags += ["--shm-dir", resolved_shm]
    command = [sys.executable, "-m", "kvbroker", "serve", *flags, *args]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(os.getpid()),
        )  # fmt: skip
    daemon = Daemon(process, command, workdir, log_path, unix_socket, resolved_shm, _cleanup=cleanup)
    if metrics_port:
        daemon.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    STARTED.append(daemon)
    try:
        wait_serving(daemon.target, process, log_path, ready_timeout)
        if tcp:
            daemon.address = _tcp_address(daemon, metrics_port, timeout=max(1.0, ready_timeout - (time.monotonic() - started)))
            # A TLS listener answers only TLS clients; the Unix socket already said SERVING.
            if "--tls-cert" not in args and _health(daemon.address, timeout=5) != health_pb2.HealthCheckResponse.SERVING:
                raise DaemonError(f"{daemon.address} does not serve health checks; log tail:\n{daemon.log_tail()}")
    except BaseException:
        daemon.stop()
        raise
    daemon.ready_seconds = time.monotonic() - started
    return daemon


def _discard_private_shm(daemon: Daemon) -> None:
    """Remove a stopped daemon's private shm directory and whatever it holds (a killed
    daemon leaves its segments and lock file: without this every such test leaked them
    into /dev/shm for good), remembering this daemon's objects for ``check_clean_exit``."""
    daemon.left_behind = daemon.shm_objects()
    shutil.rmtree(daemon.shm_dir, ignore_errors=True)


@contextlib.contextmanager
def running_daemon(workdir: Path | str | None = None, *args: str, check: bool = True, **options: Any) -> Iterator[Daemon]:
    """``start_daemon`` as a context manager: stopped on exit, and (``check``) a daemon
    that did not exit 0 or left shm objects raises ``DaemonError`` unless the block
    itself raised. Without ``workdir`` a temporary one is used and removed afterwards
    (the log's tail is in any error raised)."""
    own = workdir is None
    path = Path(tempfile.mkdtemp(prefix="kvb-daemon-")) if own else Path(workdir)
    try:
        daemon = start_daemon(path, *args, **options)
        try:
            yield daemon
        except BaseException:
            daemon.stop()
            raise
        if check:
            daemon.check_clean_exit()
        else:
            daemon.stop()
    finally:
        if own:
            shutil.rmtree(path, ignore_errors=True)


def daemon_fixture(*, scope: str = "function", name: str | None = None, **options: Any) -> Any:
    """A pytest fixture that yields a ``Daemon`` started with ``options`` (see
    ``start_daemon``) in a fresh temporary directory, and fails the teardown unless it
    exits 0 and leaves no shm object. In a test module or conftest::

        daemon = daemon_fixture(config=CONFIG, scope="module")
    """
    import pytest  # here, not at the top: benchmarks import this module without pytest

    @pytest.fixture(scope=scope, name=name)
    def _daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
        with running_daemon(tmp_path_factory.mktemp("daemon"), **options) as daemon:
            yield daemon

    return _daemon
