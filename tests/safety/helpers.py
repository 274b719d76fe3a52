"""What the safety suites check from outside a live daemon: accounting, leftovers, and
bounded waits for conditions (never fixed sleeps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from tests.support.wait import wait_until  # noqa: F401  (the suites import it from here)

ROOT = Path(__file__).resolve().parents[2]
KiB = 1 << 10
MiB = 1 << 20
SESSION_KEY = "kvbroker-session-id"


def child_env() -> dict[str, str]:
    """The environment of client processes: the repository and the client on the path."""
    paths = [str(ROOT), str(ROOT / "client"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


class Operator:
    """An anonymous operator's raw stub (no session: what grpcurl or the CLI sends)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = broker_pb2_grpc.CacheBrokerStub(self.channel)

    def stats(self) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=10)

    def caches(self, **filters) -> list[pb.Cache]:
        """Every cache, following the pages."""
        out: list[pb.Cache] = []
        token = ""
        for _ in range(100_000):
            reply = self.stub.ListCaches(pb.ListCachesRequest(page_size=1000, page_token=token, **filters), timeout=30)
            out.extend(reply.caches)
            if not reply.next_page_token or reply.next_page_token == token:
                return out
            token = reply.next_page_token
        raise AssertionError("ListCaches never reached its last page")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _usage_problems(scope: str, u: pb.Usage) -> list[str]:
    """The identities every Usage must satisfy (kvbroker/core/stats.py defines them)."""
    problems = []
    if u.free_bytes != u.total_capacity_bytes - u.total_allocated_bytes:
        problems.append(f"{scope}: free {u.free_bytes} != capacity {u.total_capacity_bytes} - allocated {u.total_allocated_bytes}")
    if u.total_allocated_bytes > u.reserved_bytes:
        problems.append(f"{scope}: allocated {u.total_allocated_bytes} > reserved (segment) bytes {u.reserved_bytes}")
    if u.reserved_bytes > u.total_capacity_bytes:
        problems.append(f"{scope}: reserved {u.reserved_bytes} > capacity {u.total_capacity_bytes}")
    if u.pinned_bytes > u.total_allocated_bytes:
        problems.append(f"{scope}: pinned {u.pinned_bytes} > allocated {u.total_allocated_bytes}")
    if u.largest_free_extent_bytes > u.free_bytes:
        problems.append(f"{scope}: largest free extent {u.largest_free_extent_bytes} > free {u.free_bytes}")
    if (u.active_caches == 0) != (u.total_allocated_bytes == 0):
        problems.append(f"{scope}: {u.active_caches} caches but {u.total_allocated_bytes} bytes allocated")
    return problems


def accounting_problems(stats: pb.StatsResponse, caches: list[pb.Cache] | None = None) -> list[str]:
    """Every way ``stats`` (and, given, the full cache list taken at a quiet moment)
    disagree with exact accounting. Empty when all is exact."""
    problems: list[str] = []
    for d in stats.devices:
        problems += _usage_problems(f"device {d.device}", d.usage)
    for p in stats.pools:
        problems += _usage_problems(f"pool {p.pool}", p.usage)
        if p.usage.total_capacity_bytes != p.max_bytes:
            problems.append(f"pool {p.pool}: capacity {p.usage.total_capacity_bytes} != max_bytes {p.max_bytes}")
    devices = [d.usage for d in stats.devices]
    pools = [p.usage for p in stats.pools]
    for field in ("total_allocated_bytes", "reserved_bytes", "pinned_bytes", "active_caches", "segments"):
        by_device = sum(getattr(u, field) for u in devices)
        by_pool = sum(getattr(u, field) for u in pools)
        if by_device != by_pool:
            problems.append(f"{field}: devices sum to {by_device}, pools to {by_pool}")
    if stats.total_allocated_bytes != sum(u.total_allocated_bytes for u in devices):
        problems.append(f"total allocated {stats.total_allocated_bytes} != sum over devices")
    if stats.total_capacity_bytes != sum(u.total_capacity_bytes for u in devices):
        problems.append(f"total capacity {stats.total_capacity_bytes} != sum over devices")
    if stats.free_bytes != stats.total_capacity_bytes - stats.total_allocated_bytes:
        problems.append(f"total free {stats.free_bytes} != capacity - allocated")
    if stats.active_caches != sum(u.active_caches for u in devices):
        problems.append(f"total active caches {stats.active_caches} != sum over devices")
    if stats.pinned_bytes != sum(u.pinned_bytes for u in devices):
        problems.append(f"total pinned {stats.pinned_bytes} != sum over devices")
    if caches is not None:
        resident = [c for c in caches if c.state == pb.CACHE_STATE_RESIDENT]
        listed = sum(c.reserved_bytes for c in resident)
        if listed != stats.total_allocated_bytes:
            problems.append(f"resident caches listed hold {listed} bytes, Stats says {stats.total_allocated_bytes}")
        if len(resident) != stats.active_caches:
            problems.append(f"{len(resident)} resident caches listed, Stats says {stats.active_caches}")
        for p in stats.pools:
            mine = [c for c in resident if c.pool == p.pool]
            if sum(c.reserved_bytes for c in mine) != p.usage.total_allocated_bytes:
                problems.append(f"pool {p.pool}: listed caches hold {sum(c.reserved_bytes for c in mine)}, Stats says {p.usage.total_allocated_bytes}")
        pinned = sum(c.reserved_bytes for c in resident if c.pinned)
        if pinned != stats.pinned_bytes:
            problems.append(f"pinned caches listed hold {pinned} bytes, Stats says {stats.pinned_bytes}")
    return problems


def assert_accounting_exact(target: str) -> pb.StatsResponse:
    """Stats and ListCaches agree and every identity holds (call when the daemon is quiet)."""
    with Operator(target) as op:
        stats = op.stats()
        caches = op.caches()
        again = op.stats()
    assert (stats.total_allocated_bytes, stats.active_caches) == (again.total_allocated_bytes, again.active_caches), (
        "the daemon is not quiet: accounting cannot be compared"
    )
    problems = accounting_problems(stats, caches)
    assert not problems, "\n".join(problems)
    return stats


def shm_problems(daemon, stats: pb.StatsResponse) -> list[str]:
    """The daemon's shm objects against its Stats: their bytes are the host device's
    reserved bytes (segments in use and segments draining, waiting for their mappers),
    and there is at least one object per segment Stats counts."""
    sizes = []
    for name in daemon.shm_objects():
        try:
            sizes.append(os.stat(os.path.join(daemon.shm_dir, name)).st_size)
        except FileNotFoundError:  # unlinked meanwhile
            return [f"{name} vanished while counting: not quiet"]
    host = [d.usage for d in stats.devices if d.device == "host"]
    if not host:
        return []
    problems = []
    if sum(sizes) != host[0].reserved_bytes:
        problems.append(f"{len(sizes)} shm objects hold {sum(sizes)} bytes; Stats says segments reserve {host[0].reserved_bytes}")
    if len(sizes) < host[0].segments:
        problems.append(f"{len(sizes)} shm objects for {host[0].segments} segments")
    return problems


def health_serving(target: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def extent_overlaps(handles: list[tuple[str, pb.Handle, int]]) -> list[str]:
    """Pairs of caches whose byte ranges intersect. ``handles``: (cache id, handle,
    reserved bytes) of live caches, read at one quiet moment."""
    by_segment: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    for cache_id, handle, reserved in handles:
        key = (handle.segment_id, handle.segment_generation)
        by_segment.setdefault(key, []).append((handle.byte_offset, max(reserved, handle.nbytes), cache_id))
    overlaps = []
    for key, extents in by_segment.items():
        extents.sort()
        for (off_a, n_a, a), (off_b, _, b) in zip(extents, extents[1:]):
            if off_a + n_a > off_b:
                overlaps.append(f"segment {key}: {a} [{off_a}, {off_a + n_a}) overlaps {b} at {off_b}")
    return overlaps


class Agent:
    """A worker process with its own ``BrokerClient`` (its own session), driven one JSON
    command per line (``tests/safety/agent.py``)."""

    def __init__(self, target: str, *, wait: bool = True) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.safety.agent", target], cwd=ROOT, text=True, env=child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.session_id = self._reply() if wait else None

    @classmethod
    def many(cls, target: str, n: int) -> list[Agent]:
        """Start ``n`` agents at once (each imports torch: seconds) and wait for all."""
        agents = [cls(target, wait=False) for _ in range(n)]
        for agent in agents:
            agent.session_id = agent._reply()
        return agents

    @staticmethod
    def close_all(agents: list[Agent]) -> None:
        """Close several agents at once (each client releases its holds and ends its
        session on the way out)."""
        for agent in agents:
            if agent.process.poll() is None:
                agent.process.stdin.close()
        for agent in agents:
            try:
                agent.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()

    def _reply(self):
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"agent died: {self.process.stderr.read()[-4000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise AgentError(reply)
        return reply["ok"]

    def __call__(self, op: str, **args):
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


class AgentError(Exception):
    """An agent's command raised: ``kind`` is the exception class, ``reply`` all it said."""

    def __init__(self, reply: dict) -> None:
        super().__init__(f"{reply['error']}: {reply.get('message', '')}")
        self.kind = reply["error"]
        self.reply = reply
