"""Cancelled calls leave no trace (issue 9.3), against a real daemon and real shm.

(a) An Allocate whose caller gives up (a 50 ms deadline) while the daemon creates a large
segment for it: the segment the backend finishes creating must be one Stats counts (no shm
object outside the accounting), and once idle it goes back, so /dev/shm returns to its
baseline.
(b) Allocates waiting for room (a full pool, a long ``wait_timeout_ms``) that the caller
cancels: when room is freed right after, no cache appears for a caller that is gone; no
leftover cache, allocated bytes back to the baseline, the queue empty.
"""

from __future__ import annotations

import os

import grpc
import pytest

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc

from .helpers import MiB, Operator, accounting_problems, shm_problems, wait_until

BIG = 512 * MiB

CONFIG_SEGMENTS = """
[devices]
host_capacity = "3GiB"

[[pools]]
name = "big"
max_bytes = "3GiB"
segment_bytes = "512MiB"
block_bytes = "1MiB"
gc_threshold = 1.0
"""

CONFIG_WAITING = """
[devices]
host_capacity = "128MiB"

[[pools]]
name = "w"
max_bytes = "64MiB"
segment_bytes = "64MiB"
block_bytes = "1MiB"
gc_threshold = 1.0
"""


class Settled:
    """True once the shm dir has stayed the same (names and sizes) over three polls and
    matches Stats: the backend work the cancelled calls started is over. (The work in
    flight cannot be seen from outside; a change of the dir can.)"""

    def __init__(self, daemon, op: Operator) -> None:
        self.daemon, self.op = daemon, op
        self.snapshots: list[object] = []

    def _snapshot(self) -> object:
        try:
            return [(n, os.stat(os.path.join(self.daemon.shm_dir, n)).st_size) for n in self.daemon.shm_objects()]
        except FileNotFoundError:
            return None

    def __call__(self) -> bool:
        self.snapshots = [*self.snapshots[-2:], self._snapshot()]
        return len(self.snapshots) == 3 and self.snapshots[0] == self.snapshots[1] == self.snapshots[2] is not None

    def problems(self) -> list[str]:
        return shm_problems(self.daemon, self.op.stats())


def test_cancelled_allocates_leave_no_uncounted_segment(start_daemon):
    """Five 512 MiB Allocates with a 50 ms deadline, each creating a segment: afterwards
    the shm objects are exactly the segments Stats counts (by bytes), no cache exists for
    the gone callers, and once the segments idle out the shm dir is back to baseline."""
    daemon = start_daemon(CONFIG_SEGMENTS, "--segment-idle-seconds", "0.2")
    baseline = daemon.shm_objects()
    with Operator(daemon.target) as op:
        outcomes = []
        for i in range(5):
            request = pb.AllocateRequest(pool="big", size_bytes=BIG, cache_id=f"cancelled-{i}")
            try:
                op.stub.Allocate(request, timeout=0.05)
                outcomes.append("ok")
                op.stub.Release(pb.ReleaseRequest(cache_id=request.cache_id), timeout=10)  # a caller that got it
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
                outcomes.append(err.code().name)
        assert "DEADLINE_EXCEEDED" in outcomes, f"test precondition: no call was cut short ({outcomes})"

        # A gone caller's cache is PENDING while its segment is still being created (it
        # is listed), and aborted when the creation ends: none may remain after that.
        wait_until(
            lambda: op.caches() == [], timeout=30, what="no cache for the callers that gave up",
            detail=lambda: [(c.cache_id, c.state) for c in op.caches()],
        )
        # The backend's work in flight settles; then what exists is what Stats counts.
        settled = Settled(daemon, op)
        wait_until(settled, timeout=20, what="the shm dir settled", interval=0.25, detail=daemon.shm_objects)
        problems = settled.problems()
        assert not problems, f"shm objects outside the accounting: {problems}"
        assert not accounting_problems(op.stats(), op.caches())
        wait_until(
            lambda: daemon.shm_objects() == baseline and op.stats().total_allocated_bytes == 0, timeout=15,
            what="the shm dir back to its baseline once the segments idle out",
            detail=lambda: (daemon.shm_objects(), str(op.stats().devices[0].usage).replace("\n", " ")),
        )
        assert not any(p.usage.segments or p.usage.reserved_bytes for p in op.stats().pools)


def _fill_pool(op: Operator) -> None:
    op.stub.Allocate(
        pb.AllocateRequest(pool="w", size_bytes=64 * MiB, cache_id="filler", pinned=True, retain=True), timeout=10
    )


def test_cancelled_waiting_allocates_never_get_a_cache(start_daemon):
    """Ten rounds: the pool is full (one pinned cache), 100 Allocates wait for room
    (``wait_timeout_ms`` 60 s) and are cancelled by their caller, then the room is freed at
    once. No cache may appear for any of them; allocated bytes return to the baseline; a
    request for the whole pool is then served at once (the queue is empty)."""
    daemon = start_daemon(CONFIG_WAITING, "--segment-idle-seconds", "60")
    with Operator(daemon.target) as op:
        baseline = op.stats().total_allocated_bytes
        for round_ in range(10):
            _fill_pool(op)
            with grpc.insecure_channel(daemon.target) as channel:
                stub = broker_pb2_grpc.CacheBrokerStub(channel)
                futures = [
                    stub.Allocate.future(
                        pb.AllocateRequest(pool="w", size_bytes=MiB, cache_id=f"gone-{round_}-{i}", wait_timeout_ms=60_000),
                        timeout=90,
                    )
                    for i in range(100)
                ]
                # One round trip on the same connection: the daemon has read the 100 calls.
                stub.Stats(pb.StatsRequest(), timeout=10)
                assert not any(f.done() for f in futures), "test precondition: the calls wait (the pool is full)"
                cancelled = [f.cancel() for f in futures]
                assert all(cancelled), "a waiting call could not be cancelled"
                # Room at once: the daemon may not have seen every cancellation yet.
                op.stub.Unpin(pb.UnpinRequest(cache_id="filler"), timeout=10)
                op.stub.Release(pb.ReleaseRequest(cache_id="filler", force=True), timeout=10)

            def clean() -> bool:
                return op.stats().total_allocated_bytes == baseline and not [c for c in op.caches() if c.cache_id.startswith("gone-")]

            wait_until(
                clean, timeout=5, what=f"round {round_}: no cache for a cancelled caller",
                detail=lambda: sorted(c.cache_id for c in op.caches())[:10],
            )
            # The queue is empty: the whole pool is served at once, and nothing appears later.
            op.stub.Allocate(pb.AllocateRequest(pool="w", size_bytes=64 * MiB, cache_id="probe"), timeout=10)
            op.stub.Release(pb.ReleaseRequest(cache_id="probe"), timeout=10)
            assert clean(), sorted(c.cache_id for c in op.caches())
            problems = accounting_problems(op.stats(), op.caches())
            assert not problems, problems
