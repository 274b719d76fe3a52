"""The sans-IO client core alone: plans driven by hand, events and stream ends applied
with an explicit clock. No channel, no thread, no daemon: what the transports do is
exactly this, with a stub in the middle."""

from __future__ import annotations

import pytest

from kvbroker import wire
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import CacheEvicted, CacheLost, CacheNotFound, InvalidRequest, PreconditionFailed, SessionLost
from kvbroker_client.core import RECONNECT_MAX_S, ClientCore, HeldState, Phase


def opened(core: ClientCore, now: float = 0.0, instance: str = "i-1", lease: float = 3.0) -> None:
    event = pb.WatchEvent(
        kind=pb.EVENT_KIND_SESSION_OPENED, session_id=core.session_id, lease_seconds=lease,
        instance_id=instance, session_secret=f"s-{core.generation}",
    )  # fmt: skip
    assert core.on_event(event, core.generation, now)


def run(plan, *responses):
    """Drive a plan with canned responses; returns (methods called, result)."""
    methods, result = [], None
    try:
        call = next(plan)
        for response in responses:
            methods.append(call.method)
            call = plan.throw(response) if isinstance(response, Exception) else plan.send(response)
        raise AssertionError(f"the plan wants more calls: {call.method}")
    except StopIteration as stop:
        result = stop.value
    return methods, result


def cache(cache_id: str = "c", retain: bool = False, created: float = 100.0, instance: str = "i-1"):
    info = pb.Cache(cache_id=cache_id, nbytes=64, retain=retain, state=pb.CACHE_STATE_RESIDENT)
    info.created_at.FromNanoseconds(int(created * 1e9))
    handle = pb.Handle(instance_id=instance, segment_id=1, segment_generation=1, nbytes=64)
    return pb.AllocateResponse(cache=info, handle=handle)


def held_by(core: ClientCore, retain: bool = False, cache_id: str = "c"):
    methods, held = run(core.allocate(size_bytes=64, retain=retain), cache(cache_id, retain))
    assert methods == ["Allocate"]
    return held


def test_calls_carry_the_session_id_then_its_secret() -> None:
    core = ClientCore("t", 5.0, None)
    first = core.call("Stats", pb.StatsRequest())
    assert first.metadata == ((wire.SESSION_ID_KEY, core.session_id),) and first.timeout == 5.0
    opened(core)
    assert core.phase is Phase.OPEN
    assert dict(core.call("Stats", pb.StatsRequest()).metadata) == {
        wire.SESSION_ID_KEY: core.session_id, wire.SESSION_SECRET_KEY: "s-1",
    }  # fmt: skip
    assert core.call("Allocate", pb.AllocateRequest(), extra_ms=2500).timeout == 7.5
    assert ClientCore("t", None, "").call("Stats", pb.StatsRequest()).metadata == ()


def test_a_lost_session_marks_its_records_and_moves_to_a_new_id() -> None:
    core = ClientCore("t", 5.0, "worker-a")
    opened(core)
    plain, kept = held_by(core), held_by(core, retain=True, cache_id="k")
    lost = core.on_stream_end(1, "UNAVAILABLE: socket closed", now=5.0)
    assert lost and "socket closed" in lost and core.sessions_lost == 1
    assert core.session_id == "worker-a.2" and core.generation == 2 and core.phase is Phase.CONNECTING
    assert dict(core.call("Stats", None).metadata) == {wire.SESSION_ID_KEY: "worker-a.2"}, "no old secret"
    assert core.state(plain) is core.state(kept) is HeldState.LOST
    # A broken stream may be a restart: until the new session says which broker it is
    # on, a use says the session is lost; once it is the same broker, the cache is lost.
    with pytest.raises(SessionLost, match="no new session is open yet") as raised:
        run(core.view(plain))
    assert not isinstance(raised.value, CacheLost)
    opened(core, now=6.0)
    with pytest.raises(CacheLost, match="socket closed"):
        run(core.view(plain))
    for plan in (core.view(plain), core.pin(plain), core.unpin(plain), core.refresh(plain)):
        with pytest.raises(SessionLost):
            run(plan)
    assert run(core.release(plain)) == ([], False) and plain.released
    # The retained one is re-attached: one Attach, then it is live under session 2.
    methods, _ = run(core.view(kept), pb.AttachResponse(cache=cache("k", True).cache, handle=cache("k").handle))
    assert methods == ["Attach"] and core.state(kept) is HeldState.LIVE and kept.generation == 2
    assert run(core.view(kept)) == ([], None)


def test_a_response_to_a_call_of_an_ended_session_is_lost_at_once() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core)
    plan = core.allocate(size_bytes=64)
    call = next(plan)
    assert call.generation == 1
    core.on_event(pb.WatchEvent(kind=pb.EVENT_KIND_SESSION_ENDED, reason="lease_expired"), 1, now=9.0)
    with pytest.raises(StopIteration) as done:
        plan.send(cache())
    held = done.value.value
    assert core.state(held) is HeldState.LOST and "lease_expired" in held.lost


def test_retained_reattach_refuses_a_gone_or_different_cache() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core)
    gone, other = held_by(core, True, "gone"), held_by(core, True, "other")
    core.on_event(pb.WatchEvent(kind=pb.EVENT_KIND_SHUTTING_DOWN), 1, now=9.0)
    with pytest.raises(CacheEvicted, match="gone from the broker"):
        run(core.view(gone), CacheEvicted("cache 'gone' was evicted"))
    assert core.state(gone) is HeldState.EVICTED
    # Same id, created at another time: ours was freed; the hold just taken is dropped.
    reborn = cache("other", True, created=999.0)
    with pytest.raises(CacheEvicted, match="names another cache"):
        run(core.view(other), pb.AttachResponse(cache=reborn.cache, handle=reborn.handle), pb.ReleaseResponse())


def test_moves_and_evictions_from_the_stream() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core)
    held = held_by(core)
    # A paged pool's sequence evicted: its event names the arena (cache_id) but the
    # arena itself stays; a client holding the arena as a cache is not touched.
    core.on_event(pb.WatchEvent(kind=pb.EVENT_KIND_EVICTED, cache_id="c", epoch=9, sequence_id="seq-1"), 1, now=1.0)
    assert core.state(held) is HeldState.LIVE
    core.on_event(pb.WatchEvent(kind=pb.EVENT_KIND_MOVED, cache_id="c", epoch=3), 1, now=1.0)
    assert core.state(held) is HeldState.STALE
    with pytest.raises(PreconditionFailed, match="await cache.refresh"):
        core.ready(held)
    moved = pb.Handle(instance_id="i-1", segment_id=2, segment_generation=1, nbytes=64, epoch=3)
    methods, _ = run(core.view(held), pb.AttachResponse(cache=cache().cache, handle=moved))
    assert methods == ["Attach"] and held.handle.segment_id == 2 and core.state(held) is HeldState.LIVE
    core.on_event(pb.WatchEvent(kind=pb.EVENT_KIND_EVICTED, cache_id="c", epoch=4), 1, now=1.0)
    with pytest.raises(CacheEvicted):
        core.ready(held)


def test_reconnect_backoff_keeps_an_unused_id_and_doubles_to_a_cap() -> None:
    core = ClientCore("t", 5.0, None)
    first_id = core.session_id
    delays = []
    for _ in range(8):
        assert core.on_stream_end(core.generation, "UNAVAILABLE", now=0.0) is None
        delays.append(core.reconnect_delay())
    assert core.session_id == first_id and core.sessions_lost == 0, "nothing was held under it"
    assert delays[:3] == [0.05, 0.1, 0.2] and delays[-1] == RECONNECT_MAX_S
    opened(core, now=10.0)
    held_by(core)
    core.on_stream_end(core.generation, "broke", now=20.0)  # a healthy session: retry at once
    assert core.reconnect_delay() == 0.0 and core.session_id != first_id


def test_a_new_broker_instance_loses_holds_taken_from_the_old_one() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core, instance="old")
    core.on_stream_end(1, "broke", now=5.0)
    held = held_by(core)  # taken from "old" before its end was noticed... the handle says so
    held.handle.instance_id = "old"
    opened(core, now=6.0, instance="new")
    assert core.state(held) is HeldState.LOST and "restarted" in held.lost


def test_the_schedule_beats_every_third_of_the_lease_and_can_be_suspended() -> None:
    core = ClientCore("t", 5.0, None)
    assert core.due(100.0) == [], "nothing before the session is open"
    opened(core, now=0.0, lease=3.0)
    assert core.due(0.5) == []
    assert [c.method for c in core.due(1.0)] == ["Heartbeat"]
    core.on_event(pb.WatchEvent(kind=pb.EVENT_KIND_SEGMENT_RETIRED, segment_id=4, segment_generation=2), 1, 1.1)
    core.suspend_heartbeats()
    assert core.due(9.0) == []
    core.suspend_heartbeats(False)
    due = core.due(9.0)
    assert [c.method for c in due] == ["ReportUnmapped", "Heartbeat"]
    assert (due[0].request.segment_id, due[0].request.segment_generation) == (4, 2)
    assert due[1].timeout == 3.0


def test_closing_releases_what_is_held_and_refuses_later_calls() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core)
    held_by(core, cache_id="a")
    held_by(core, cache_id="b")
    methods, _ = run(core.close(), pb.ReleaseResponse(freed=True), PreconditionFailed("refused"))
    assert methods == ["Release", "Release"] and core.closed
    with pytest.raises(RuntimeError, match="closed"):
        core.call("Stats", None)
    assert core.watch_call() is None and core.on_stream_end(1, "cancelled", 1.0) is None


def test_session_ids_are_checked_and_anonymous_clients_have_no_session() -> None:
    with pytest.raises(InvalidRequest, match="^session_id: "):
        ClientCore("t", 5.0, "bad id!")
    anonymous = ClientCore("t", 5.0, "")
    assert anonymous.phase is Phase.ANONYMOUS and anonymous.watch_call() is None
    assert anonymous.state(held_by(anonymous)) is HeldState.LIVE


def test_a_forced_release_of_a_lost_cache_never_frees_another_cache_of_that_id() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core)
    plain, kept, reborn = held_by(core), held_by(core, True, "k"), held_by(core, True, "r")
    core.on_stream_end(1, "broke", now=5.0)
    assert run(core.release(plain, force=True)) == ([], False), "not retained: freed with its session"
    same = cache("k", True)
    plan = core.release(kept, force=True)
    assert next(plan).method == "Attach"
    forced = plan.send(pb.AttachResponse(cache=same.cache, handle=same.handle))
    assert forced.method == "Release" and forced.request.force
    other = cache("r", True, created=555.0)
    plan = core.release(reborn, force=True)
    next(plan)
    dropped = plan.send(pb.AttachResponse(cache=other.cache, handle=other.handle))
    assert dropped.method == "Release" and not dropped.request.force, "only the hold the Attach took"
    with pytest.raises(StopIteration) as done:
        plan.send(pb.ReleaseResponse())
    assert done.value.value is False and reborn.released


def test_an_allocation_this_process_cannot_reach_is_given_back_before_the_error() -> None:
    """Issue 10.1: a failed ``allocate()`` leaves no cache behind, retained or not."""
    from kvbroker_client import BrokerUnavailable, StaleHandleError

    def unreachable(handle: pb.Handle) -> None:
        raise StaleHandleError("/dev/shm/kvb-1-i-1-1 does not exist")

    core = ClientCore("t", 5.0, None)
    opened(core)
    plan = core.allocate(size_bytes=64, retain=True, check=unreachable)
    assert next(plan).method == "Allocate"
    release = plan.send(cache("k", retain=True))
    assert release.method == "Release" and release.request == pb.ReleaseRequest(cache_id="k", force=True)
    with pytest.raises(StaleHandleError) as raised:
        plan.send(pb.ReleaseResponse(freed=True))
    assert raised.value.__notes__ == ["cache 'k' was allocated, then released again"]
    assert core._held == {}

    plan = core.allocate(size_bytes=64, retain=True, check=unreachable)
    next(plan)
    plan.send(cache("m", retain=True))
    with pytest.raises(StaleHandleError) as raised:
        plan.throw(BrokerUnavailable("connection refused"))
    assert "could not be given back (BrokerUnavailable" in raised.value.__notes__[0]


def test_after_a_restart_every_record_is_reattached_by_id_or_lost() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core, instance="old")
    plain, kept = held_by(core, cache_id="p"), held_by(core, retain=True, cache_id="k")
    other = held_by(core, cache_id="o")
    for held in (plain, kept, other):
        held.handle.instance_id = "old"
    core.on_stream_end(1, "UNAVAILABLE: Socket closed", now=5.0)  # SIGKILL: the stream broke
    with pytest.raises(SessionLost, match="no new session is open yet") as raised:
        run(core.view(plain))
    assert not isinstance(raised.value, CacheLost), "not known yet: it may come back"

    assert core.stranded() == [], "no session open: nothing to re-attach yet"
    opened(core, now=6.0, instance="new")  # another broker instance: a restart
    assert {h.cache_id for h in core.stranded()} == {"p", "k", "o"}, "each re-attached in the background"
    assert core.stranded() == [], "once"
    restored = cache("p", retain=True, created=555.0, instance="new")  # its checkpoint's copy
    methods, _ = run(core.view(plain), pb.AttachResponse(cache=restored.cache, handle=restored.handle))
    assert methods == ["Attach"] and core.state(plain) is HeldState.LIVE, "not retained, yet restored"
    assert plain.handle.instance_id == "new" and plain.generation == 2
    with pytest.raises(CacheLost, match="restarted without it"):
        run(core.view(kept), CacheNotFound("cache 'k' not found"))
    with pytest.raises(CacheLost):
        run(core.view(kept))  # and stays lost, without a call
    # Same id on the new broker, but another kind of cache: not ours; its hold is given back.
    bigger = cache("o", instance="new")
    bigger.cache.nbytes = 128
    with pytest.raises(CacheLost, match="names another cache"):
        run(core.view(other), pb.AttachResponse(cache=bigger.cache, handle=bigger.handle), pb.ReleaseResponse())


def test_a_session_ended_by_a_live_broker_loses_what_was_not_retained_at_once() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core)
    plain = held_by(core)
    core.on_event(pb.WatchEvent(kind=pb.EVENT_KIND_SESSION_ENDED, reason="ended_by_operator"), 1, now=9.0)
    assert core.phase is Phase.CONNECTING
    with pytest.raises(CacheLost, match="ended_by_operator"):
        run(core.view(plain))  # no restart is possible: freed, no call
    opened(core, now=10.0)
    assert core.stranded() == [], "the same broker: nothing is re-attached in the background"


def test_the_first_watch_fails_fast_and_later_ones_wait_for_the_broker() -> None:
    core = ClientCore("t", 5.0, None)
    assert [core.watch_waits_for_ready() for _ in range(3)] == [False, True, True]


def test_an_attach_may_wait_for_room_and_its_deadline_grows_by_the_wait() -> None:
    core = ClientCore("t", 5.0, None)
    opened(core)
    plan = core.attach("c", wait_timeout_ms=2500)
    call = next(plan)
    assert call.request.wait_timeout_ms == 2500 and call.timeout == pytest.approx(5.0 + 2.5)
    plan.close()
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidRequest, match="wait_timeout_ms"):
            next(core.attach("c", wait_timeout_ms=bad))
