"""The image built from the Dockerfile, run for real (podman): the broker serves gRPC
health and /metrics to callers outside the container; a worker outside the container,
sharing the socket directory and the shared memory, maps what a worker inside wrote and
the other way round; SIGTERM stops the container cleanly within the grace period; and
without its token secret the broker refuses to listen on 0.0.0.0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvbroker.server.app import SERVICE_NAME
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from tests.support.daemon import ROOT, child_env
from tests.support.wait import wait_until

from .conftest import Node
from .containers import Container, podman, running_container

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first build on a machine: minutes

WORKER = "/usr/local/share/kvbroker/example_worker.py"
GRACE_SECONDS = 5.0  # deploy/container/kvbroker.toml: grace_seconds
PUBLISH = ["-p", "127.0.0.1::50051", "-p", "127.0.0.1::9464"]


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2).status
        except grpc.RpcError:
            return -1


def wait_serving(container: Container) -> str:
    target = f"127.0.0.1:{container.port(50051)}"
    wait_until(lambda: container.state()[0] != "running" or health(target) == health_pb2.HealthCheckResponse.SERVING,
               90, "the broker in the container answers SERVING", detail=container.logs)  # fmt: skip
    assert container.state()[0] == "running", container.logs()
    return target


def outside_worker(node: Node, *args: str) -> subprocess.CompletedProcess:
    """The example worker as a process on the host (this repository's client)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "container" / "example_worker.py"), *args, "--target", node.target],
        capture_output=True, text=True, timeout=120, env=child_env({"KVBROKER_TOKEN_FILE": str(node.token_file)}),
    )  # fmt: skip


def inside_worker(container: Container, *args: str) -> subprocess.CompletedProcess:
    return container.exec("python", WORKER, *args, env={"KVBROKER_TOKEN_FILE": "/run/secrets/kvbroker-token"})


@pytest.fixture(scope="module")
def broker(image: str, shared_node: Node) -> Iterator[Container]:
    """One broker container for the tests that only use it."""
    with running_container(image, *PUBLISH, *shared_node.mounts(), "-e", "KVBROKER_HOST_CAPACITY=64MiB") as broker:
        wait_serving(broker)
        yield broker


def test_health_and_metrics_answer_outside_the_container(broker: Container, shared_node: Node) -> None:
    node = shared_node
    target = wait_serving(broker)
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.port(9464)}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert 'kvbroker_device_capacity_bytes{device="host"} 6.7108864e+07' in reply.read().decode()
    # The image's HEALTHCHECK (kvbroker ping over the socket, inside the container).
    assert podman("healthcheck", "run", broker.name, check=False).returncode == 0, broker.logs()
    # 0.0.0.0 is served with authorization on: health is open, the broker is not.
    with grpc.insecure_channel(target) as channel:
        stub = broker_pb2_grpc.CacheBrokerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Stats(pb.StatsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stats = stub.Stats(pb.StatsRequest(), timeout=10, metadata=(("authorization", f"Bearer {node.token}"),))
        assert [p.pool for p in stats.pools] == ["default"]


def test_a_worker_outside_maps_what_a_worker_inside_wrote(broker: Container, shared_node: Node) -> None:
    node = shared_node
    wrote = inside_worker(broker, "write", "--cache-id", "from-inside", "--size", "4MiB")
    assert wrote.returncode == 0, wrote.stdout + wrote.stderr + broker.logs()
    read = outside_worker(node, "read", "--cache-id", "from-inside")
    assert read.returncode == 0, read.stdout + read.stderr + broker.logs()
    assert "read 4194304 bytes of cache from-inside: as written" in read.stdout
    # And back: written outside, read inside.
    wrote = outside_worker(node, "write", "--cache-id", "from-outside", "--size", "2MiB")
    assert wrote.returncode == 0, wrote.stdout + wrote.stderr
    read = inside_worker(broker, "read", "--cache-id", "from-outside")
    assert read.returncode == 0, read.stdout + read.stderr + broker.logs()
    assert "read 2097152 bytes of cache from-outside: as written" in read.stdout


def test_sigterm_stops_the_container_cleanly_within_the_grace_period(image: str, node: Node) -> None:
    with running_container(image, *PUBLISH, *node.mounts(), "-e", "KVBROKER_HOST_CAPACITY=64MiB") as broker:
        wait_serving(broker)
        wrote = outside_worker(node, "write", "--cache-id", "held-at-stop")
        assert wrote.returncode == 0, wrote.stdout + wrote.stderr
        assert [p for p in node.shm_dir.iterdir() if not p.name.endswith(".lock")], "no segment in use"
        started = time.monotonic()
        podman("kill", "--signal", "TERM", broker.name)
        wait_until(lambda: broker.state()[0] == "exited", GRACE_SECONDS + 10,
                   "the container exited after SIGTERM", detail=broker.logs)  # fmt: skip
        took = time.monotonic() - started
        assert broker.state()[1] == 0, broker.logs()
        assert "stopped; all segments freed" in broker.logs()
        assert list(node.shm_dir.iterdir()) == [], f"left in the shared memory after {took:.1f} s"
        assert not (node.socket_dir / "kvbroker.sock").exists()


def test_without_its_token_secret_the_broker_refuses_to_serve_0_0_0_0(image: str, node: Node) -> None:
    with running_container(image, *node.mounts(token=False)) as broker:
        wait_until(lambda: broker.state()[0] == "exited", 90, "the broker exited", detail=broker.logs)
        assert broker.state()[1] != 0
        assert "token_file: cannot read /run/secrets/kvbroker-token" in broker.logs()


def sigterm_caught(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (``SigCgt`` in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_during_start_up_stops_the_container_at_once(image: str, node: Node) -> None:
    """PID 1 ignores signals it has no handler for: kvbroker installs one first thing, so
    a SIGTERM in the seconds before the daemon serves (and installs its own) still stops
    it, rather than the runtime's SIGKILL after its grace."""
    with running_container(image, *node.mounts()) as broker:
        pid = int(podman("inspect", broker.name, "--format", "{{.State.Pid}}").stdout)
        wait_until(lambda: sigterm_caught(pid), 30, "kvbroker (PID 1 in the container) handles SIGTERM")
        podman("kill", "--signal", "TERM", broker.name)
        wait_until(lambda: broker.state()[0] == "exited", 15, "the container exited after SIGTERM", detail=broker.logs)
        # 143: stopped during start-up; 0: it was already serving and stopped cleanly.
        assert broker.state()[1] in (0, 143), broker.logs()
        assert [p for p in node.shm_dir.iterdir() if not p.name.endswith(".lock")] == []
