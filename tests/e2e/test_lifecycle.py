"""Start and stop: zero-config start, config errors that name the key, SIGTERM with calls
in flight, nothing left in its shm directory, stale objects of a dead broker removed at start."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc

from tests.support.daemon import ROOT, running_daemon, wait_serving
from tests.support.wait import holds_for

MiB = 1 << 20


def test_sigterm_with_a_call_in_flight_exits_cleanly(tmp_path):
    # check=False: this test sends SIGTERM itself and checks the exit on its own terms.
    with running_daemon(tmp_path, host_capacity="32MiB", check=False) as daemon:
        with grpc.insecure_channel(daemon.target) as channel:
            stub = broker_pb2_grpc.CacheBrokerStub(channel)
            stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=30 * MiB, cache_id="big", pinned=True))
            assert daemon.shm_objects(), "a segment exists while the cache lives"
            outcome: dict[str, object] = {}

            def waiting_call() -> None:
                try:
                    stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=8 * MiB, wait_timeout_ms=60_000))
                    outcome["code"] = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    outcome["code"] = err.code()

            caller = threading.Thread(target=waiting_call)
            caller.start()
            holds_for(caller.is_alive, 0.5, "the allocation waits for room")
            started = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(timeout=20) == 0, daemon.log()
            caller.join(timeout=10)
        assert time.monotonic() - started < 2 + 5, "grace period (2 s) plus shutdown work"
        assert outcome["code"] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert daemon.shm_objects() == []
        assert not os.path.exists(daemon.unix_socket)
        assert "shutting down" in daemon.log()


def test_config_error_names_the_key_and_exits_2(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[pools]]\nname = "a"\nmax_bytes = "lots"\n')
    done = subprocess.run(
        [sys.executable, "-m", "kvbroker", "serve", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "pools[0].max_bytes" in done.stderr


def test_pool_device_error_names_the_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[pools]]\nname = "a"\ndevices = ["cuda:3"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "kvbroker", "serve", "--devices", "host", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "pools[0].devices" in done.stderr


def test_stale_shm_objects_of_a_dead_broker_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # The directory both brokers used (a shared --shm-dir, as /dev/shm is by default).
    shared = tempfile.mkdtemp(prefix="kvb-test-", dir="/dev/shm")
    # A dead broker leaves its objects and its lock file (kvbroker/memory/owner.py): the
    # unlocked lock file is what proves it dead, whatever PID namespace it ran in.
    stale = f"{shared}/kvb-{dead.pid}-deadbeef-1-1"
    lock = f"{shared}/kvb-{dead.pid}-deadbeef.lock"
    # An object with no lock file (an older broker, or one of another namespace that is
    # alive) is never removed, only reported.
    orphan = f"{shared}/kvb-{dead.pid}-cafebabe-1-1"
    for path in (stale, lock, orphan):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096 if path != lock else b"")
    try:
        with running_daemon(tmp_path, shm_dir=shared) as daemon:
            assert not os.path.exists(stale) and not os.path.exists(lock)
            assert os.path.exists(orphan)
            assert "removed 1 shm objects" in daemon.log()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_zero_config_start_serves_the_host_device_on_the_defaults(tmp_path):
    if not _port_free(50051) or not _port_free(9464) or os.path.exists("/tmp/kvbroker.sock"):
        pytest.skip("the default address is taken by another broker on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBROKER_")}
    log = tmp_path / "log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "kvbroker", "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving("127.0.0.1:50051", process, log)
        with grpc.insecure_channel("unix:///tmp/kvbroker.sock") as channel:
            stats = broker_pb2_grpc.CacheBrokerStub(channel).Stats(pb.StatsRequest())
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="kvbroker.v1.CacheBroker")
            )
        assert [p.pool for p in stats.pools] == ["default"]
        assert [d.device for d in stats.devices] == ["host"]
        assert stats.total_capacity_bytes == 1 << 30
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log.read_text()
    assert not os.path.exists("/tmp/kvbroker.sock")
