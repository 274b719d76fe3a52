"""Sessions, events, arbitration and waiting, with real client processes against a real
daemon: crashed and hung clients are reclaimed, holders learn of evictions and moves,
pools get their guaranteed minimum back, waiting allocations are served in order, and
idle memory moves from one pool to another."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker_client import AllocationTimeout, BrokerClient
from tests.support.daemon import ROOT, daemon_fixture
from tests.support.driven import DrivenProcess, WorkerError
from tests.support.wait import holds_for, wait_until

MiB = 1 << 20

CONFIG = """
[devices]
host_capacity = "64MiB"

[sessions]
lease_seconds = 1.0
segment_idle_seconds = 0.5

[[pools]]
name = "x"
min_bytes = "16MiB"
max_bytes = "48MiB"
segment_bytes = "16MiB"
block_bytes = "1MiB"
gc_threshold = 1.0

[[pools]]
name = "y"
min_bytes = "24MiB"
max_bytes = "48MiB"
segment_bytes = "8MiB"
block_bytes = "1MiB"
priority = 5
gc_threshold = 1.0
"""


#: A fresh daemon per test: the tests end sessions, exhaust pools and time leases.
daemon = daemon_fixture(config=CONFIG)

class Agent(DrivenProcess):
    """A worker process with its own session, driven line by line (tests/e2e/agent.py)."""

    def __init__(self, target: str) -> None:
        super().__init__("tests.e2e.agent", target, name="agent")


#: The agent's failed command (its exception's class name in ``kind``).
AgentError = WorkerError


def stats(daemon) -> pb.StatsResponse:
    with grpc.insecure_channel(daemon.target) as channel:
        return broker_pb2_grpc.CacheBrokerStub(channel).Stats(pb.StatsRequest())


def test_a_killed_client_is_reclaimed_within_a_second(daemon):
    agent = Agent(daemon.target)
    for i in range(3):
        agent("allocate", pool="x", size_bytes=4 * MiB, cache_id=f"doomed-{i}")
    agent("allocate", pool="x", size_bytes=2 * MiB, cache_id="kept", retain=True)
    assert stats(daemon).total_allocated_bytes == 14 * MiB
    agent.kill()
    started = time.monotonic()
    wait_until(lambda: stats(daemon).total_allocated_bytes == 2 * MiB, 1.0, "the killed client's caches are freed")
    assert time.monotonic() - started < 1.0
    ids = {c.cache_id for c in BrokerClient(daemon.target, session_id="").list_caches()}
    assert ids == {"kept"}, "the retained cache outlives its producer; the rest are freed"
    assert "ended (stream_closed)" in daemon.log()


def _kill_cycle(target: str, index: int) -> None:
    code = (
        "import sys, os, signal\n"
        "from kvbroker_client import BrokerClient\n"
        "c = BrokerClient(sys.argv[1])\n"
        "for i in range(2): c.allocate('x', size_bytes=1048576)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, target], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_200_kill_cycles_leak_nothing(daemon):
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: _kill_cycle(daemon.target, i), range(200)))
    wait_until(lambda: stats(daemon).total_allocated_bytes == 0, 2.0, "every killed client's caches are freed")
    final = stats(daemon)
    assert final.active_caches == 0
    assert final.allocation_count == 400


def test_a_hung_client_is_reclaimed_after_its_lease(daemon):
    agent = Agent(daemon.target)
    agent("allocate", pool="x", size_bytes=4 * MiB)
    os.kill(agent.process.pid, signal.SIGSTOP)  # stream open, no heartbeat
    try:
        holds_for(lambda: stats(daemon).total_allocated_bytes == 4 * MiB, 0.5,
                  "the hung client keeps its cache within its 1 s lease")  # fmt: skip
        wait_until(lambda: stats(daemon).total_allocated_bytes == 0, 2.0, "the lease expires and the cache is freed")
        assert "ended (lease_expired)" in daemon.log()
    finally:
        agent.kill()


def test_holders_learn_of_evictions_and_moves(daemon):
    b = Agent(daemon.target)
    for name in ("b0", "b1", "b2"):
        b("allocate", pool="x", size_bytes=4 * MiB, cache_id=name)
        b("fill", cache_id=name, salt=len(name) + int(name[1]))
    # A (pool x, same priority) needs room: x's policy evicts B's least recently used
    # cache, b0. B's next use says so.
    with BrokerClient(daemon.target) as a:
        for i in range(10):
            a.allocate("x", size_bytes=4 * MiB, cache_id=f"a{i}", pinned=True)
    # The EVICTED event reaches B on its Watch stream, independently of B's calls: B's
    # client knows of the eviction only once it has applied the event (before that, its
    # old view still reads the old bytes, which nobody has overwritten yet).
    wait_until(lambda: b("state", cache_id="b0")["evicted"], 10, "B's client applies the EVICTED event of b0")
    with pytest.raises(AgentError) as info:
        b("check", cache_id="b0", salt=2)
    assert info.value.kind == "CacheEvicted"
    # a0..a9 are released (A closed; its session ends when the daemon sees its stream
    # close): then a defragment moves b1 or b2 or both; B's next tensor() follows the
    # MOVED event to the new place and reads the same bytes.
    wait_until(lambda: stats(daemon).total_allocated_bytes == 8 * MiB, 10, "A's session ends and a0..a9 are freed")
    offsets = {name: b("offset", cache_id=name) for name in ("b1", "b2")}
    with BrokerClient(daemon.target, session_id="") as operator:
        moved = operator.defragment(pool="x")
        epochs = {c.cache_id: c.epoch for c in operator.list_caches(pool="x")}
    assert moved.caches_moved >= 1
    movers = [name for name in ("b1", "b2") if epochs[name] > b("state", cache_id=name)["handle_epoch"]]
    assert len(movers) == moved.caches_moved, (movers, moved)
    wait_until(lambda: all(b("state", cache_id=name)["stale"] for name in movers), 10,
               f"B's client applies the MOVED events of {movers}")  # fmt: skip
    assert b("check", cache_id="b1", salt=3) and b("check", cache_id="b2", salt=4)
    assert {name: b("offset", cache_id=name) for name in ("b1", "b2")} != offsets
    b.close()


def test_a_guaranteed_pool_gets_its_minimum_back_and_no_pool_exceeds_its_maximum(daemon):
    hog = Agent(daemon.target)
    # x takes the whole device (64 MiB > its 48 MiB max: it stops at its quota).
    for i in range(12):
        try:
            hog("allocate", pool="x", size_bytes=4 * MiB, cache_id=f"x{i}")
        except AgentError as err:
            assert err.kind == "CacheExhausted"
    pools = {p.pool: p.usage for p in stats(daemon).pools}
    assert pools["x"].reserved_bytes == 48 * MiB and pools["x"].total_allocated_bytes == 48 * MiB
    # y (guaranteed 24 MiB, higher priority) asks for memory that x holds: x's segments
    # are taken (its caches evicted, its mapping drained), y gets its minimum.
    with BrokerClient(daemon.target) as y:
        got = [y.allocate("y", size_bytes=8 * MiB, wait_timeout_ms=5000) for _ in range(3)]
        pools = {p.pool: p.usage for p in stats(daemon).pools}
        assert pools["y"].total_allocated_bytes == 24 * MiB
        assert pools["x"].reserved_bytes >= 16 * MiB, "x keeps its own minimum"
        assert all(p.reserved_bytes <= 48 * MiB for p in pools.values())
        for cache in got:
            cache.release()
    hog.close()


def test_waiting_allocations(daemon):
    with BrokerClient(daemon.target) as holder, BrokerClient(daemon.target) as waiter:
        big = holder.allocate("x", size_bytes=44 * MiB, pinned=True)
        # Does not fit now, fits once the holder releases: it waits and is served.
        outcome = {}

        def wait_for_room() -> None:
            started = time.monotonic()
            outcome["cache"] = waiter.allocate("x", size_bytes=40 * MiB, wait_timeout_ms=10_000, pinned=True)
            outcome["waited"] = time.monotonic() - started

        thread = threading.Thread(target=wait_for_room)
        thread.start()
        holds_for(lambda: "cache" not in outcome and thread.is_alive(), 0.5, "the allocation waits for room")
        big.unpin()
        big.release()
        thread.join(timeout=10)
        assert outcome["waited"] >= 0.4
        assert outcome["cache"].nbytes == 40 * MiB

        # A short timeout: DEADLINE_EXCEEDED, and nothing allocated.
        before = stats(daemon).total_allocated_bytes
        with pytest.raises(AllocationTimeout):
            waiter.allocate("x", size_bytes=40 * MiB, wait_timeout_ms=300)
        assert stats(daemon).total_allocated_bytes == before


def test_a_cancelled_wait_leaves_no_trace(daemon):
    with BrokerClient(daemon.target) as holder:
        big = holder.allocate("x", size_bytes=44 * MiB, pinned=True)
        with grpc.insecure_channel(daemon.target) as channel:
            stub = broker_pb2_grpc.CacheBrokerStub(channel)
            call = stub.Allocate.future(
                pb.AllocateRequest(pool="x", size_bytes=40 * MiB, cache_id="never", wait_timeout_ms=30_000)
            )
            holds_for(lambda: not call.done(), 0.3, "the allocation waits for room")
            wait_until(lambda: sum(p.waiting_allocations for p in stats(daemon).pools) == 1, 30, "the broker queues the allocation")
            call.cancel()
            assert call.cancelled()
            # The cancellation travels to the broker on its own: until the broker has seen
            # it, freeing room would legitimately serve the wait (and then roll it back).
            wait_until(lambda: sum(p.waiting_allocations for p in stats(daemon).pools) == 0, 30, "the broker drops the cancelled wait")
        big.unpin()
        big.release()
        # Room now: a cancelled wait that was still queued would be served at once.
        holds_for(lambda: stats(daemon).total_allocated_bytes == 0, 0.5, "nothing is allocated for the cancelled wait")
        caches = holder.list_caches()
        assert "never" not in {c.cache_id for c in caches}
        assert stats(daemon).total_allocated_bytes == 0
        # The queue is empty: a request that fits is served at once.
        holder.allocate("x", size_bytes=40 * MiB).release()


def test_idle_memory_moves_from_one_pool_to_another(daemon):
    x = Agent(daemon.target)
    for i in range(3):
        x("allocate", pool="x", size_bytes=16 * MiB, cache_id=f"burst-{i}")
        x("fill", cache_id=f"burst-{i}", salt=i)
    assert {p.pool: p.usage.reserved_bytes for p in stats(daemon).pools}["x"] == 48 * MiB
    for i in range(3):
        x("release", cache_id=f"burst-{i}")
    # After the idle time the segments drain; x's process unmaps (no view is alive) and
    # reports it; then the memory is back on the device.
    x("drop_views")
    wait_until(lambda: {p.pool: p.usage.reserved_bytes for p in stats(daemon).pools}["x"] == 0, 5,
               "x's drained segments go back to the device")  # fmt: skip
    with BrokerClient(daemon.target) as y:
        got = [y.allocate("y", size_bytes=8 * MiB) for _ in range(6)]
        assert {p.pool: p.usage.total_allocated_bytes for p in stats(daemon).pools}["y"] == 48 * MiB
        for cache in got:
            cache.release()
    x.close()
