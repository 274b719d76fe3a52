"""Data exposure between tenants, end to end (issues 9.1 and 9.2): separate client
processes, each its own session, against a real daemon and real shm.

9.1: memory a tenant gave back, or that a compaction moved a cache away from, reads as
zeros for the next tenant placed there; never as the previous tenant's bytes.
9.2: once the broker ended a tenant's session (its lease ran out while the process was
stopped) and gave its memory to another tenant, the first tenant's stub refuses to build a
view of it (a typed error), so it cannot write into the other tenant's cache.
"""

from __future__ import annotations

import signal

import pytest

from kvbroker.v1 import broker_pb2 as pb

from .helpers import MiB, Agent, AgentError, Operator, assert_accounting_exact, wait_until

#: One pool per test, so that each test's placement is its own whatever the others did.
CONFIG = """
[devices]
host_capacity = "64MiB"
""" + "".join(
    f"""
[[pools]]
name = "{name}"
max_bytes = "8MiB"
segment_bytes = "8MiB"
block_bytes = "64KiB"
gc_threshold = 1.0
"""
    for name in ("reuse", "compaction", "lease")
)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """One daemon (lease 1 s; empty segments kept, so freed bytes are reused in place)
    and three tenant processes started at once: A, B, and a victim of a lease expiry."""
    from .conftest import _stop_clean, start_safety_daemon

    daemon = start_safety_daemon(
        tmp_path_factory.mktemp("exposure"), CONFIG, "--lease-seconds", "1", "--segment-idle-seconds", "60"
    )
    agents = []
    try:
        agents = Agent.many(daemon.target, 3)
        yield daemon, agents
    finally:
        for agent in agents:
            try:
                agent.signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
        Agent.close_all(agents)
        _stop_clean(daemon)


def same_place(a: dict, b: dict) -> bool:
    return (a["segment"], a["offset"]) == (b["segment"], b["offset"])


def release_quietly(agent: Agent, placed: dict) -> None:
    try:
        agent("release", cache_id=placed["cache_id"], force=True)
    except AgentError:
        pass


def test_a_released_cache_reads_as_zeros_for_the_next_tenant(tenants):
    """A fills 1 MiB with 0xAB and releases it; B is placed on the very same bytes and
    must read only zeros, never A's data."""
    daemon, (a, b, _) = tenants
    placed_a = a("allocate", pool="reuse", size_bytes=MiB)
    a("fill", cache_id=placed_a["cache_id"], value=0xAB)
    assert a("values", cache_id=placed_a["cache_id"]) == [0xAB]
    a("release", cache_id=placed_a["cache_id"])

    placed_b = b("allocate", pool="reuse", size_bytes=MiB)
    try:
        assert same_place(placed_a, placed_b), ("test precondition: B lands where A was", placed_a, placed_b)
        assert b("values", cache_id=placed_b["cache_id"]) == [0], "B reads A's bytes"
    finally:
        release_quietly(b, placed_b)
    assert_accounting_exact(daemon.target)


def test_the_place_a_compaction_left_reads_as_zeros(tenants):
    """A holds two caches; the first is released and a Defragment moves the second
    (filled with 0xCD) into the hole. B's new cache, placed where the moved cache was,
    must read zeros; the moved cache keeps its bytes."""
    daemon, (a, b, _) = tenants
    first = a("allocate", pool="compaction", size_bytes=MiB)
    second = a("allocate", pool="compaction", size_bytes=MiB)
    a("fill", cache_id=second["cache_id"], value=0xCD)
    a("release", cache_id=first["cache_id"])
    with Operator(daemon.target) as op:
        moved = op.stub.Defragment(pb.DefragmentRequest(pool="compaction"), timeout=30)
    assert moved.caches_moved == 1, moved
    now = a("where", cache_id=second["cache_id"])
    assert same_place(now, first), ("the compaction moved the cache into the hole", now, first)
    assert a("values", cache_id=second["cache_id"]) == [0xCD], "the moved cache lost its bytes"

    placed_b = b("allocate", pool="compaction", size_bytes=MiB)
    try:
        assert same_place(placed_b, second), ("test precondition: B lands where the moved cache was", placed_b, second)
        assert b("values", cache_id=placed_b["cache_id"]) == [0], "B reads the moved cache's old bytes"
    finally:
        release_quietly(b, placed_b)
        release_quietly(a, second)
    assert_accounting_exact(daemon.target)


def test_a_tenant_whose_session_ended_cannot_write_into_the_next_tenants_cache(tenants):
    """A (lease 1 s) allocates and fills a cache, then is stopped (SIGSTOP): the broker
    ends its session and frees the cache; B is placed on the same bytes and fills them.
    A resumes (SIGCONT) and touches its cache through the stub: ``tensor()`` must raise a
    typed error (``SessionLost``) and B's bytes must be intact."""
    daemon, (_, b, a) = tenants
    placed_a = a("allocate", pool="lease", size_bytes=MiB)
    a("fill", cache_id=placed_a["cache_id"], value=0x5A)
    with Operator(daemon.target) as op:
        a.signal(signal.SIGSTOP)
        lease_pool = lambda: next(p.usage for p in op.stats().pools if p.pool == "lease")  # noqa: E731
        wait_until(lambda: lease_pool().total_allocated_bytes == 0, timeout=10, what="A's session ended by its lease")
        placed_b = b("allocate", pool="lease", size_bytes=MiB)
        assert same_place(placed_a, placed_b), ("test precondition: B lands where A was", placed_a, placed_b)
        b("fill", cache_id=placed_b["cache_id"], value=0x11)

        a.signal(signal.SIGCONT)
        outcome = "no error"
        try:
            outcome = a("write_after_resume", cache_id=placed_a["cache_id"], value=0xEE)
        except AgentError as err:
            outcome = err.reply
        try:
            assert b("values", cache_id=placed_b["cache_id"]) == [0x11], f"A wrote into B's cache ({outcome})"
            assert isinstance(outcome, dict) and outcome["session_lost"], f"expected SessionLost from tensor(), got {outcome}"
        finally:
            release_quietly(b, placed_b)
