"""The client's side of a broker session: the Watch stream, heartbeats and events.

A ``BrokerClient`` with a session id opens ``Watch`` when it is created, in a background
thread, and heartbeats at a third of the lease the broker announced, so the broker knows
at once when the process dies (the stream breaks) and within a lease when it hangs.

Events are applied to the client's caches as they arrive:

- ``EVICTED``: the cache is marked evicted; its next ``tensor()`` raises ``CacheEvicted``.
- ``MOVED``: the cache is marked stale; its next ``tensor()`` or ``pinned()`` fetches a
  fresh handle (one Attach) before building the view.
- ``SEGMENT_RETIRED``: the process-wide mapper forgets the segment; once no tensor of the
  process uses it any more, the client reports the unmapping (``ReportUnmapped``) so the
  broker can give the memory back to the device.
- ``SHUTTING_DOWN``: the broker is stopping; calls fail from then on.

Cost: two daemon threads per sync client; nothing on the call path. An ``AsyncBrokerClient``
runs the same loop as one asyncio task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
from typing import Any

import grpc

from kvbroker.v1 import broker_pb2 as pb

log = logging.getLogger(__name__)

#: How often retired segments are checked for their last view (and reported).
UNMAP_POLL_SECONDS = 0.2


def watch_request(session_id: str) -> pb.WatchRequest:
    return pb.WatchRequest(
        session_id=session_id,
        client_name=os.path.basename(sys.argv[0] or "python")[:128],
        pid=os.getpid(),
        host=socket.gethostname()[:256],
    )


class SessionState:
    """What the stream tells the client: the lease, held caches' fates, and the retired
    segments still to report. Written by the watcher, read by callers; every update is
    a single attribute or set operation, atomic under the GIL."""

    def __init__(self, held: dict[str, Any]) -> None:
        self.held = held
        self.lease_seconds = 10.0
        self.opened = threading.Event()
        self.shutting_down = False
        self.ended = False
        self.instance_id = ""
        self.pending_unmaps: set[tuple[str, int, int]] = set()
        self._since_beat = 0.0

    def apply(self, event: pb.WatchEvent) -> None:
        kind = event.kind
        if kind == pb.EVENT_KIND_SESSION_OPENED:
            self.lease_seconds = event.lease_seconds or self.lease_seconds
            self.instance_id = event.instance_id
            self.opened.set()
        elif kind in (pb.EVENT_KIND_EVICTED, pb.EVENT_KIND_MOVED):
            cache = self.held.get(event.cache_id)
            if cache is not None:
                cache._note_event(kind, event.epoch)
        elif kind == pb.EVENT_KIND_SEGMENT_RETIRED:
            from kvbroker_client.mapping import process_mapper
            from kvbroker_client.mapping import SegmentKey

            key = SegmentKey(self.instance_id, event.segment_id, event.segment_generation)
            process_mapper().retire(key)
            self.pending_unmaps.add(key)
        elif kind == pb.EVENT_KIND_SHUTTING_DOWN:
            self.shutting_down = True

    def due(self, elapsed_s: float) -> tuple[list[pb.ReportUnmappedRequest], bool]:
        """One poll of the background loop, ``elapsed_s`` after the previous one: the
        unmapping reports to send now, and whether a heartbeat is due (every third of
        the lease)."""
        reports = [
            pb.ReportUnmappedRequest(segment_id=segment_id, segment_generation=generation)
            for _, segment_id, generation in self.unmapped()
        ]
        self._since_beat += elapsed_s
        beat = self._since_beat >= self.lease_seconds / 3
        if beat:
            self._since_beat = 0.0
        return reports, beat

    def unmapped(self) -> list[tuple[str, int, int]]:
        """Retired segments that no tensor of this process uses any more (to report)."""
        if not self.pending_unmaps:
            return []
        from kvbroker_client.mapping import process_mapper

        mapper = process_mapper()
        done = [key for key in list(self.pending_unmaps) if not mapper.still_mapped(key)]
        self.pending_unmaps.difference_update(done)
        return done


class SyncSession:
    """The Watch stream and the heartbeat of a ``BrokerClient``, in two daemon threads."""

    def __init__(self, stub: Any, session_id: str, metadata: tuple, held: dict[str, Any]) -> None:
        self.state = SessionState(held)
        self._stub = stub
        self._metadata = metadata
        self._stop = threading.Event()
        self._call = stub.Watch(watch_request(session_id), metadata=metadata)
        self._watcher = threading.Thread(target=self._watch, name="kvbroker-watch", daemon=True)
        self._beater = threading.Thread(target=self._beat, name="kvbroker-heartbeat", daemon=True)
        self._watcher.start()
        self._beater.start()

    def _watch(self) -> None:
        try:
            for event in self._call:
                self.state.apply(event)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                log.warning("kvbroker session stream ended: %s", err.details())
        finally:
            self.state.ended = True
            self.state.opened.set()

    def _beat(self) -> None:
        while not self._stop.wait(UNMAP_POLL_SECONDS):
            if self.state.ended:
                return
            reports, beat = self.state.due(UNMAP_POLL_SECONDS)
            try:
                for report in reports:
                    self._stub.ReportUnmapped(report, metadata=self._metadata, timeout=10)
                if beat:
                    self._stub.Heartbeat(pb.HeartbeatRequest(), metadata=self._metadata, timeout=10)
            except grpc.RpcError as err:
                log.debug("kvbroker heartbeat failed: %s", err.details())

    def report_unmapped_now(self) -> None:
        """Report retired segments no longer in use without waiting for the next poll."""
        reports, _ = self.state.due(0.0)
        for report in reports:
            self._stub.ReportUnmapped(report, metadata=self._metadata, timeout=10)

    def close(self) -> None:
        """End the stream (the broker then ends the session) and stop the threads."""
        self._stop.set()
        self._call.cancel()
        self._watcher.join(timeout=5)
        self._beater.join(timeout=5)


class AsyncSession:
    """The same for an ``AsyncBrokerClient``: one task reads the stream, one beats."""

    def __init__(self, stub: Any, session_id: str, metadata: tuple, held: dict[str, Any]) -> None:
        self.state = SessionState(held)
        self._stub = stub
        self._metadata = metadata
        self._call = stub.Watch(watch_request(session_id), metadata=metadata)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch()), loop.create_task(self._beat())]

    async def _watch(self) -> None:
        try:
            async for event in self._call:
                self.state.apply(event)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                log.warning("kvbroker session stream ended: %s", err.details())
        finally:
            self.state.ended = True
            self.state.opened.set()

    async def _beat(self) -> None:
        while not self.state.ended:
            await asyncio.sleep(UNMAP_POLL_SECONDS)
            reports, beat = self.state.due(UNMAP_POLL_SECONDS)
            try:
                for report in reports:
                    await self._stub.ReportUnmapped(report, metadata=self._metadata, timeout=10)
                if beat:
                    await self._stub.Heartbeat(pb.HeartbeatRequest(), metadata=self._metadata, timeout=10)
            except grpc.RpcError as err:
                log.debug("kvbroker heartbeat failed: %s", err.details())

    async def close(self) -> None:
        self._call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
