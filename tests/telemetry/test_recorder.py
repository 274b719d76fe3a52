"""The recorder: outcomes, bounded labels, and the recent window of the Stats RPC."""

from __future__ import annotations

import asyncio

from kvbroker.core.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted
from kvbroker.telemetry.recorder import Recorder, outcome_of
from kvbroker.wire import SessionEndReason


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_outcomes_of_allocation_errors() -> None:
    exhausted = ResourceExhausted("x", requested_bytes=1, free_bytes=0, largest_free_extent_bytes=0, satisfiable=True)
    assert [outcome_of(e) for e in (None, exhausted, DeadlineExceeded("x"), InvalidArgument("f", "x"),
                                    NotFound("x"), asyncio.CancelledError(), RuntimeError("bug"))] == [
        "ok", "exhausted", "timeout", "invalid", "not_found", "cancelled", "error"
    ]  # fmt: skip


def test_label_values_are_bounded() -> None:
    r = Recorder(("default",))
    for i in range(100):
        r.allocation_finished(f"pool-{i}", NotFound("x"))
        r.allocation_waited(f"pool-{i}", 0.1)
        r.session_reclaimed(f"reason {i}")
    r.session_reclaimed(SessionEndReason.LEASE_EXPIRED)
    snap = r.snapshot()
    allocations = {k: n for k, n in snap.counters["kvbroker_allocations_total"].items() if n}
    assert allocations == {("", "not_found"): 100}
    assert {pool for pool, _ in snap.counters["kvbroker_allocations_total"]} == {"", "default"}
    assert list(snap.histograms["kvbroker_allocation_wait_seconds"]) == [("",)]
    reclaimed = snap.counters["kvbroker_sessions_reclaimed_total"]
    assert {k: n for k, n in reclaimed.items() if n} == {("other",): 100, ("lease_expired",): 1}
    assert set(reclaimed) == {(r.value,) for r in SessionEndReason} | {("other",)}, "known reasons start at 0"


def test_rpc_stats_cover_the_recent_window_per_method() -> None:
    clock = Clock()
    r = Recorder(("default",), clock=clock)
    for _ in range(98):
        r.rpc_finished("kvbroker.v1.CacheBroker", "Allocate", "OK", 0.0008)
    for _ in range(2):
        r.rpc_finished("kvbroker.v1.CacheBroker", "Allocate", "RESOURCE_EXHAUSTED", 0.004)
    r.rpc_finished("grpc.health.v1.Health", "Check", "OK", 0.0002)
    clock.now += 30
    stats = r.rpc_stats()
    assert stats.window_seconds == 30  # the daemon is younger than the window
    check, allocate = stats.methods  # ordered by service, then method
    assert (allocate.method, allocate.calls, allocate.errors_by_code) == ("Allocate", 100, (("RESOURCE_EXHAUSTED", 2),))
    assert 0.00075 < allocate.p50_seconds <= 0.001 and 0.003 < allocate.p99_seconds <= 0.005
    assert check.method == "grpc.health.v1.Health/Check"
    assert (allocate.calls_total, check.calls_total) == (100, 1)
    clock.now += 600  # ten minutes later: nothing recent, but the totals stay (rates)
    later = {m.method: m for m in r.rpc_stats().methods}
    assert later["Allocate"].calls == 0 and later["Allocate"].calls_total == 100
    assert later["Allocate"].errors_by_code == ()
    assert r.snapshot().histograms["kvbroker_rpc_duration_seconds"][
        ("kvbroker.v1.CacheBroker", "Allocate", "OK")
    ].count == 98  # the cumulative series keep everything
