"""The test daemon launcher (tests/support/daemon.py) and the condition waits
(tests/support/wait.py) do what the rest of tests/ and benchmarks/ rely on: a daemon on
its own port and socket, ready when it serves, stopped by PID (SIGKILL if SIGTERM is not
enough), dead when the process that started it dies, and a failed start that shows why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from tests.support.daemon import PRIVATE_SHM, ROOT, DaemonError, child_env, running_daemon
from tests.support.wait import Lines, WaitTimeout, holds_for, wait_until

MiB = 1 << 20


def gone(pid: int) -> bool:
    """No such process, or only its zombie (PID 1 of a container may not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_daemon_serves_on_a_kernel_chosen_port_and_a_private_socket(tmp_path):
    with running_daemon(tmp_path) as daemon:
        host, port = daemon.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert len(daemon.unix_socket) < 108 and os.path.exists(daemon.unix_socket)
        for target in (daemon.target, daemon.address):
            with grpc.insecure_channel(target) as channel:
                assert broker_pb2_grpc.CacheBrokerStub(channel).Stats(pb.StatsRequest(), timeout=10).devices
    assert daemon.exit_code == 0
    assert not os.path.exists(os.path.dirname(daemon.unix_socket)), "the socket directory is removed"


def test_a_private_shm_dir_holds_the_segments_and_goes_away(tmp_path):
    with running_daemon(tmp_path, shm_dir=PRIVATE_SHM) as daemon:
        assert daemon.shm_dir.startswith("/dev/shm/") and daemon.shm_dir != "/dev/shm"
        with grpc.insecure_channel(daemon.target) as channel:
            stub = broker_pb2_grpc.CacheBrokerStub(channel)
            cache = stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=MiB), timeout=30).cache
            assert daemon.shm_objects(), "the segment lives in the private directory"
            stub.Release(pb.ReleaseRequest(cache_id=cache.cache_id), timeout=10)
    assert not os.path.exists(daemon.shm_dir)


def test_a_failed_start_says_why(tmp_path):
    with pytest.raises(DaemonError) as info:
        with running_daemon(tmp_path, config='[[pools]]\nname = "a"\nmax_bytes = "lots"\n'):
            pass
    assert "exited with 2" in str(info.value) and "pools[0].max_bytes" in str(info.value)


def test_stop_kills_a_daemon_that_does_not_end_on_sigterm(tmp_path):
    with running_daemon(tmp_path, check=False) as daemon:
        os.kill(daemon.pid, signal.SIGSTOP)  # SIGTERM stays pending: it cannot run
        started = time.monotonic()
        assert daemon.stop(timeout=1.0) == -signal.SIGKILL
        assert time.monotonic() - started < 10
    assert "killed" in daemon.log()


LAUNCHER = textwrap.dedent(
    """
    import json, os, sys, tempfile
    from tests.support.daemon import start_daemon
    daemon = start_daemon(tempfile.mkdtemp(prefix="kvb-launcher-"))
    print(json.dumps([daemon.pid, str(daemon.workdir), os.path.dirname(daemon.unix_socket), daemon.shm_dir]), flush=True)
    sys.stdin.readline()  # blocks until the test kills this process
    """
)


def test_a_daemon_dies_with_the_process_that_started_it():
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], cwd=ROOT, env=child_env(), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    left: list[str] = []
    try:
        pid, *left = json.loads(Lines(launcher.stdout, "launcher").next(60, "the daemon's pid and directories"))
        assert not gone(pid)
        launcher.kill()
        launcher.wait(10)
        wait_until(lambda: gone(pid), 20, f"daemon {pid} ends after its parent was killed")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for path in left:  # nobody else cleans up after a killed launcher (its private shm directory too)
            shutil.rmtree(path, ignore_errors=True)


def test_wait_until_returns_the_value_or_says_what_did_not_happen():
    values = iter([0, None, "", "done"])
    assert wait_until(lambda: next(values), 5, "the fourth value") == "done"
    with pytest.raises(WaitTimeout, match=r"not met within 0.05 s: the impossible"):
        wait_until(lambda: False, 0.05, "the impossible")


def test_holds_for_fails_as_soon_as_the_claim_breaks():
    holds_for(lambda: True, 0.05, "always")
    deadline = time.monotonic() + 0.1
    with pytest.raises(AssertionError, match="stopped holding after .* the flag stays up"):
        holds_for(lambda: time.monotonic() < deadline, 10, "the flag stays up")
    assert time.monotonic() < deadline + 5, "it failed at the break, not at the end of the window"
