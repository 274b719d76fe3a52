"""The session half of the client's sans-IO core (``kvbroker_client.core``): opening a
session (the Watch call, its backoff), applying the stream's events, what a lost session
means for the held records, and the heartbeat and ``ReportUnmapped`` schedule.

``SessionRules`` is a mixin of ``ClientCore``, which owns the state it reads and writes
(the lock, the table of held records, the session's id, secret and phase); it is split
out only to keep each file readable. The rules themselves are described in
``kvbroker_client.core``'s docstring.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from kvbroker_client.calls import Call, new_session_id
from kvbroker_client.held import Held, HeldState, Phase
from kvbroker.v1 import broker_pb2 as pb

__all__ = ["RECONNECT_FIRST_S", "RECONNECT_MAX_S", "STABLE_SESSION_S", "UNMAP_POLL_SECONDS", "SessionRules", "loaded_mapper"]

#: How often the transports ask ``due()`` (retired segments checked, heartbeats sent).
UNMAP_POLL_SECONDS = 0.2
#: Reconnection backoff while the broker is down: doubling from the first to the cap.
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.05, 2.0
#: A session that lived this long was healthy: its loss is retried at once.
STABLE_SESSION_S = 1.0


class SessionRules:
    """The session's rules; the state is ``ClientCore``'s (declared here for readers)."""

    _lock: threading.RLock
    _held: dict[str, Held]
    _pending_unmaps: set[tuple[int, int]]
    _phase: Phase
    _generation: int
    _session_id: str
    _base_id: str | None
    _secret: str
    _attempts: int
    _opened_at: float | None
    _last_beat: float
    _client: tuple[str, int, str]
    _suspended: bool
    _watch_attempted: bool
    _stranded: dict[str, Held]
    _maybe_restarted: bool
    lease_seconds: float
    instance_id: str
    sessions_lost: int
    last_loss: str

    def _call(self, method: str, request: Any, timeout: float | None) -> Call:
        raise NotImplementedError  # ClientCore's

    def _notify_phase(self) -> None:
        raise NotImplementedError  # ClientCore's

    def _revoke(self, held: Held) -> None:
        raise NotImplementedError  # ClientCore's

    def state(self, held: Held) -> HeldState:
        raise NotImplementedError  # ClientCore's

    def _restarted_since(self, held: Held) -> bool:
        raise NotImplementedError  # ClientCore's


    def watch_waits_for_ready(self) -> bool:
        """Whether the next Watch should wait for the broker (gRPC's ``wait_for_ready``):
        every attempt but the client's first, which fails fast so that a client created
        while the broker is down is created at once. A waiting Watch opens the session
        the moment the channel connects, instead of after a backoff of its own."""
        with self._lock:
            waits, self._watch_attempted = self._watch_attempted, True
            return waits

    def watch_call(self) -> Call | None:
        """The Watch call that opens the current session; None when there is none to open
        (anonymous, or closed)."""
        with self._lock:
            if self._phase in (Phase.ANONYMOUS, Phase.CLOSED):
                return None
            name, pid, host = self._client
            request = pb.WatchRequest(session_id=self._session_id, client_name=name, pid=pid, host=host)
            return self._call("Watch", request, None)

    def reconnect_delay(self) -> float:
        """Seconds to wait before the next Watch attempt: 0 after a healthy session's loss,
        then doubling to ``RECONNECT_MAX_S`` while attempts keep failing."""
        if self._attempts == 0:
            return 0.0
        return min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** (self._attempts - 1))

    def on_event(self, event: pb.WatchEvent, generation: int, now: float) -> bool:
        """Apply one event of the stream opened for ``generation``. Returns False when
        that stream is over for this client (the transport stops reading it)."""
        with self._lock:
            if generation != self._generation or self._phase is Phase.CLOSED:
                return False
            kind = event.kind
            if kind == pb.EVENT_KIND_SESSION_OPENED:
                self._opened(event, now)
            elif kind in (pb.EVENT_KIND_EVICTED, pb.EVENT_KIND_MOVED) and not event.sequence_id:  # a sequence's: not the cache
                held = self._held.get(event.cache_id)
                if held is not None and held.generation == generation:
                    if kind == pb.EVENT_KIND_EVICTED:
                        held.evicted = True
                    held.moved_epoch = max(held.moved_epoch, event.epoch)
                    if kind == pb.EVENT_KIND_EVICTED or event.epoch > held.handle.epoch:
                        # The old place is free: views of it must not reach it. A move this
                        # client already followed (its Attach answered at that epoch, e.g.
                        # a restore from an offload tier) is old news: its views are current.
                        self._revoke(held)
            elif kind == pb.EVENT_KIND_SEGMENT_RETIRED:
                mapper = loaded_mapper()
                if mapper is not None:
                    mapper.retire((self.instance_id, event.segment_id, event.segment_generation))
                self._pending_unmaps.add((event.segment_id, event.segment_generation))
            elif kind in (pb.EVENT_KIND_SESSION_ENDED, pb.EVENT_KIND_SHUTTING_DOWN):
                ended = kind == pb.EVENT_KIND_SESSION_ENDED
                name = "the broker ended the session" if ended else "the broker is stopping"
                self._lose(f"{name}: {event.reason}" if event.reason else name, now, maybe_restart=not ended)
                return False
            return True

    def _opened(self, event: pb.WatchEvent, now: float) -> None:
        self.lease_seconds = event.lease_seconds or self.lease_seconds
        self._secret = event.session_secret
        self._phase, self._opened_at, self._last_beat = Phase.OPEN, now, now
        if self.instance_id and event.instance_id != self.instance_id:
            # Another broker process: holds of this generation taken from the old one
            # (between its end and this stream) are gone, and so are its segments.
            for held in self._held.values():
                if held.handle.instance_id != event.instance_id and held.generation == self._generation:
                    held.lost = "the broker restarted"
                    self._stranded[held.cache_id] = held
            mapper = loaded_mapper()
            if mapper is not None:
                mapper.drop_instance(self.instance_id)
        self.instance_id = event.instance_id
        self._notify_phase()  # after instance_id: a waiting call must see which broker this is

    def stranded(self) -> list[Held]:
        """Once a new session is open on a restarted broker: the records of ended
        sessions taken from an earlier instance and not held again yet, for the
        transport to re-attach at once (``view`` on each), so that a cache the broker
        restored (a persistent pool: same id, retained, nobody holding it) is held again
        before anything evicts it. Each record is returned once. On the same broker a
        retained record is re-attached on its next use, as before."""
        with self._lock:
            if self._phase is not Phase.OPEN:
                return []
            records, self._stranded = list(self._stranded.values()), {}
            return [h for h in records if self.state(h) is HeldState.LOST and self._restarted_since(h)]

    def on_stream_end(self, generation: int, detail: str, now: float) -> str | None:
        """The stream opened for ``generation`` ended (``detail`` says how). Returns why the
        session was lost, or None when nothing was lost (a closed client, an old stream,
        or an attempt that never opened a session nor took a hold: retried, same id)."""
        with self._lock:
            if generation != self._generation or self._phase in (Phase.CLOSED, Phase.ANONYMOUS):
                return None
            if self._phase is Phase.OPEN or any(h.generation == generation for h in self._held.values()):
                reason = f"its Watch stream ended: {detail}"
                self._lose(reason, now)
                return reason
            self._attempts += 1
            return None

    def _lose(self, reason: str, now: float, *, maybe_restart: bool = True) -> None:
        """The current session is over: mark its records, revoke their views, and move
        to a new id. ``maybe_restart``: False when a live broker ended the session (its
        non-retained caches are freed, whatever comes next). Caller holds the lock.
        ``sessions_lost`` is counted last: whoever sees it grow sees the views revoked."""
        self.last_loss = reason
        self._maybe_restarted = maybe_restart
        for cache_id, held in list(self._held.items()):
            if held.generation == self._generation:
                held.lost = reason
                self._revoke(held)
                self._stranded[cache_id] = held
                if not held.info.retain:
                    del self._held[cache_id]  # its ``Cache`` keeps the record for its next use
        healthy = self._opened_at is not None and now - self._opened_at >= STABLE_SESSION_S
        self._attempts = 0 if healthy else self._attempts + 1
        self._generation += 1
        self._session_id = f"{self._base_id[:100]}.{self._generation}" if self._base_id else new_session_id()
        self._secret = ""
        self._pending_unmaps.clear()
        self._phase, self._opened_at = Phase.CONNECTING, None
        self.sessions_lost += 1

    def due(self, now: float, *, heartbeat: bool = True) -> list[Call]:
        """The calls the schedule wants now: a ``ReportUnmapped`` for each retired segment
        no tensor of this process uses any more (so the broker can give the memory back),
        and a Heartbeat every third of the lease. Nothing while the session is not open
        or the schedule is suspended. Cost: a weak-reference check per retired segment."""
        with self._lock:
            if self._phase is not Phase.OPEN or self._suspended:
                return []
            mapper = loaded_mapper()
            done = [
                key for key in self._pending_unmaps
                if mapper is None or not mapper.still_mapped((self.instance_id, *key))
            ]  # fmt: skip
            self._pending_unmaps.difference_update(done)
            reports = [pb.ReportUnmappedRequest(segment_id=s, segment_generation=g) for s, g in done]
            calls = [self._call("ReportUnmapped", r, self.lease_seconds) for r in reports]
            if heartbeat and now - self._last_beat >= self.lease_seconds / 3:
                self._last_beat = now
                calls.append(self._call("Heartbeat", pb.HeartbeatRequest(), self.lease_seconds))
            return calls


def loaded_mapper() -> Any:
    """The process's ``SegmentMapper`` if this process has mapped anything; None when
    ``kvbroker_client.mapping`` (and torch) was never imported: then nothing is mapped,
    and retiring a segment must not cost torch's import."""
    # A module still being imported (by another thread) has built no view yet either.
    get = getattr(sys.modules.get("kvbroker_client.mapping"), "process_mapper", None)
    return None if get is None else get()
