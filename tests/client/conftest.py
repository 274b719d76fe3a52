"""A scripted in-process CacheBroker for client tests: real gRPC, no daemon.

The fake answers from what a test puts in it (a stats response, a list of caches served
in pages, a host segment to hand out) and aborts with the status a test names, so the
client stub and the CLI are tested over the wire without the server package. Its Watch
opens a session like the daemon's (SESSION_OPENED with a lease and a secret) and streams
what a test pushes (``push``, ``end_session``); session traffic (Watch, Heartbeat,
ReportUnmapped) is kept apart from ``calls``, in ``session_calls``.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc

#: A cache id of this form makes Attach abort with that status: "abort:NOT_FOUND".
ABORT_PREFIX = "abort:"


@dataclass
class FakeBroker(broker_pb2_grpc.CacheBrokerServicer):
    stats_response: pb.StatsResponse = field(default_factory=pb.StatsResponse)
    caches: list[pb.Cache] = field(default_factory=list)
    segment: pb.HostSegmentHandle | None = None
    calls: list[tuple[str, object, dict[str, str]]] = field(default_factory=list)
    pins: dict[str, int] = field(default_factory=dict)
    released: list[tuple[str, bool]] = field(default_factory=list)
    session_calls: list[tuple[str, object, dict[str, str]]] = field(default_factory=list)
    streams: dict[str, queue.Queue] = field(default_factory=dict)
    lease_seconds: float = 10.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, name: str, request: object, context: grpc.ServicerContext) -> None:
        self.calls.append((name, request, dict(context.invocation_metadata())))

    def _instance(self) -> str:
        # One broker instance per segment: the process-wide mapper caches segments by
        # (instance, segment id, generation) across tests.
        return self.segment.shm_name if self.segment is not None else "fake"

    def _handle(self, nbytes: int) -> pb.Handle:
        handle = pb.Handle(instance_id=self._instance(), segment_id=1, segment_generation=1, nbytes=nbytes)
        if self.segment is not None:
            handle.host.CopyFrom(self.segment)
        return handle

    def _cache(self, cache_id: str) -> pb.Cache:
        for cache in self.caches:
            if cache.cache_id == cache_id:
                return cache
        return pb.Cache(cache_id=cache_id, pool="default", nbytes=64, device="host")

    def Allocate(self, request, context):
        self._record("Allocate", request, context)
        nbytes = request.size_bytes or 64
        cache = pb.Cache(
            cache_id=request.cache_id or "c-1", pool=request.pool, model_name=request.model_name,
            nbytes=nbytes, device="host", state=pb.CACHE_STATE_RESIDENT, dtype=request.dtype,
            shape=request.shape, pinned=request.pinned, retain=request.retain,
        )  # fmt: skip
        self.caches.append(cache)
        return pb.AllocateResponse(cache=cache, handle=self._handle(nbytes))

    def Attach(self, request, context):
        self._record("Attach", request, context)
        if request.cache_id.startswith(ABORT_PREFIX):
            code = grpc.StatusCode[request.cache_id.removeprefix(ABORT_PREFIX)]
            context.abort(code, f"scripted {code.name} for {request.cache_id}")
        cache = self._cache(request.cache_id)
        handle = self._handle(cache.nbytes)
        handle.epoch = cache.epoch
        return pb.AttachResponse(cache=cache, handle=handle)

    def Release(self, request, context):
        self._record("Release", request, context)
        self.released.append((request.cache_id, request.force))
        return pb.ReleaseResponse(freed=len([r for r in self.released if r[0] == request.cache_id]) == 1)

    def Pin(self, request, context):
        self._record("Pin", request, context)
        self.pins[request.cache_id] = self.pins.get(request.cache_id, 0) + 1
        cache = pb.Cache()
        cache.CopyFrom(self._cache(request.cache_id))
        cache.pinned, cache.pin_count, cache.epoch = True, self.pins[request.cache_id], 7
        handle = self._handle(cache.nbytes)
        handle.epoch = 7
        return pb.PinResponse(cache=cache, handle=handle)

    def Unpin(self, request, context):
        self._record("Unpin", request, context)
        if not self.pins.get(request.cache_id):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"cache {request.cache_id!r} is not pinned by this caller"
            )
        self.pins[request.cache_id] -= 1
        cache = pb.Cache()
        cache.CopyFrom(self._cache(request.cache_id))
        cache.pin_count = self.pins[request.cache_id]
        cache.pinned = cache.pin_count > 0
        return pb.UnpinResponse(cache=cache)

    def Stats(self, request, context):
        self._record("Stats", request, context)
        return self.stats_response

    def ListCaches(self, request, context):
        """Pages like the real servicer: sorted by id, the token is the last id served."""
        self._record("ListCaches", request, context)
        matching = sorted(
            (c for c in self.caches if (not request.pool or c.pool == request.pool)
             and (not request.state or c.state == request.state)),
            key=lambda c: c.cache_id,
        )  # fmt: skip
        if request.page_token:
            matching = [c for c in matching if c.cache_id > request.page_token]
        size = request.page_size or 100
        page = matching[:size]
        token = page[-1].cache_id if len(matching) > size else ""
        return pb.ListCachesResponse(caches=page, next_page_token=token)

    def Defragment(self, request, context):
        self._record("Defragment", request, context)
        return pb.DefragmentResponse(dry_run=request.dry_run, caches_moved=2, bytes_moved=3 << 20)

    def Watch(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.session_calls.append(("Watch", request, metadata))
        session_id = metadata.get("kvbroker-session-id") or request.session_id
        events: queue.Queue = queue.Queue()
        with self.lock:
            self.streams[session_id] = events
        yield pb.WatchEvent(
            kind=pb.EVENT_KIND_SESSION_OPENED, session_id=session_id, lease_seconds=self.lease_seconds,
            instance_id=self._instance(), session_secret=f"secret-of-{session_id}",
        )  # fmt: skip
        while context.is_active():
            try:
                event = events.get(timeout=0.05)
            except queue.Empty:
                continue
            if event is None:
                return
            yield event

    def Heartbeat(self, request, context):
        self.session_calls.append(("Heartbeat", request, dict(context.invocation_metadata())))
        return pb.HeartbeatResponse(lease_seconds=self.lease_seconds)

    def ReportUnmapped(self, request, context):
        self.session_calls.append(("ReportUnmapped", request, dict(context.invocation_metadata())))
        return pb.ReportUnmappedResponse()

    def push(self, session_id: str, event: pb.WatchEvent | None) -> None:
        """Send ``event`` on the session's stream (None ends the stream)."""
        with self.lock:
            self.streams[session_id].put(event)

    def end_session(self, session_id: str, reason: str = "lease_expired") -> None:
        """What the daemon does when a lease lapses: SESSION_ENDED, then the stream ends."""
        self.push(session_id, pb.WatchEvent(kind=pb.EVENT_KIND_SESSION_ENDED, reason=reason))
        self.push(session_id, None)

    def requests(self, name: str) -> list[object]:
        return [request for method, request, _ in self.calls if method == name]


@dataclass
class Served:
    broker: FakeBroker
    target: str


@pytest.fixture
def fake_broker() -> Iterator[Served]:
    broker = FakeBroker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    broker_pb2_grpc.add_CacheBrokerServicer_to_server(broker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Served(broker, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)


@pytest.fixture
def host_segment() -> Iterator[pb.HostSegmentHandle]:
    """A real 1 MiB POSIX shm object, as the daemon would create it."""
    name = f"kvb-clienttest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = f"/dev/shm/{name}"
    size = 1 << 20
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        yield pb.HostSegmentHandle(shm_name=name, size_bytes=size, st_dev=st.st_dev, st_ino=st.st_ino)
    finally:
        os.unlink(path)
