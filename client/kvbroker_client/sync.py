"""``BrokerClient``: the synchronous transport of the client core.

Everything the client decides is in ``kvbroker_client.core``; this module only performs
the I/O the core asks for: unary calls over one ``grpc`` channel (``drive``), and the
session in two daemon threads: one reads the Watch stream (re-opening a session, with
backoff, whenever one is lost), one sends what ``core.due()`` says is due (heartbeats at
a third of the lease, ``ReportUnmapped`` for retired segments no view uses any more).

Cost: one RPC per call, except ``list_caches`` (one per page); two threads per client
with a session, nothing on the call path. Channels connect lazily and unary calls fail
fast (no wait-for-ready) while the broker is down; the Watch that opens a session waits
for the broker (gRPC's ``wait_for_ready``, after a first attempt that fails fast so the
constructor returns at once), and the channel retries its connection at most every 2 s
(``kvbroker_client.calls.CHANNEL_OPTIONS``), so a client created before the broker, or
across its restart, opens its session within seconds of the broker being up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker_client.cache import Cache
from kvbroker_client.calls import DEFAULT_TIMEOUT_S, Plan, channel_options, list_caches_request, resolve_target
from kvbroker_client.credentials import Credentials
from kvbroker_client.core import UNMAP_POLL_SECONDS, ClientCore, Phase
from kvbroker_client.dtypes import DTypeLike
from kvbroker_client.errors import BrokerUnavailable, KvBrokerError, from_rpc_error
from kvbroker_client.handles import check_handle
from kvbroker_client.paged import DEFAULT_GRANT_TOKENS, PagedPool
from kvbroker_client.summary import summarize
from kvbroker_client.units import PriorityLike, SizeLike

__all__ = ["BrokerClient"]

log = logging.getLogger("kvbroker_client")
T = TypeVar("T")

class InFlight(Generic[T]):
    """A call sent by ``BrokerClient.begin``. ``done()`` never blocks; ``result()`` waits
    for the answer and returns the plan's value, or raises its typed error."""

    def __init__(self, plan: Plan[T], future: Any, target: str) -> None:
        self._plan, self._future, self._target = plan, future, target

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> T:
        try:
            response = self._future.result()
        except grpc.RpcError as err:
            self._plan.throw(from_rpc_error(err, target=self._target))
        else:
            try:
                self._plan.send(response)
            except StopIteration as stop:
                return stop.value
        raise RuntimeError("a plan given to BrokerClient.begin made a second call")


class BrokerClient:
    """Synchronous client of one broker. Thread-safe: one client per process is enough.

    A client with a session (the default) opens it when created and keeps one open for
    its whole life: when a session is lost (its lease lapsed, the broker stopped or
    restarted, the stream broke), the caches held under it raise ``SessionLost`` on next
    use (a retained one is re-attached instead), and the client opens a new session with
    a new id, so new calls keep working once the broker is back.

    Args:
        target: ``host:port`` or ``unix:///path/to/socket``; default ``$KVBROKER_TARGET``,
            else ``127.0.0.1:50051``.
        timeout_s: deadline of each call (None: no deadline).
        session_id: the first session's id; default a fresh one; ``""`` calls as the
            broker's anonymous holder (for operators' tools: no session, no Watch).
        options: extra gRPC channel options.
        token, tls_ca, tls_cert, tls_key: credentials for a broker with principals
            (``kvbroker_client/credentials.py``: each defaults to its ``KVBROKER_*``
            variable); none are needed by a broker without them.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        session_id: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        target = resolve_target(target)
        self._credentials = Credentials.resolve(token, tls_ca, tls_cert, tls_key)
        self._core = ClientCore(target, timeout_s, session_id, lambda: self._credentials.metadata(target))
        self._channel = self._credentials.channel(target, channel_options(options))
        self._stub = broker_pb2_grpc.CacheBrokerStub(self._channel)
        self._session: _Session | None = None
        #: Called (on the Watch thread) with each event about a paged pool's sequence.
        self.sequence_listeners: list[Callable[[pb.WatchEvent], None]] = []
        if self._core.phase is not Phase.ANONYMOUS:
            self._session = _Session(self._core, self._stub, self._recover, self.sequence_listeners)
            # Calls made before the session is open would hold caches under a lease-only
            # session; wait for the first attempt's outcome (fails fast if the broker is down).
            self._session.first_attempt.wait(timeout_s)

    @property
    def target(self) -> str:
        return self._core.target

    @property
    def session_id(self) -> str:
        """The current session's id (a new one after each lost session); empty for an
        anonymous client."""
        return self._core.session_id

    @property
    def core(self) -> ClientCore:
        """The sans-IO state: held caches, the session's phase and counters (read by
        ``Cache`` and by tests; ``suspend_heartbeats`` is a test hook)."""
        return self._core

    def drive(self, plan: Plan[T]) -> T:
        """Run a core plan: perform each call it yields, send back the response or throw in
        the typed error (``kvbroker_client.errors``, with the ``grpc.RpcError`` as its ``rpc_error``).
        The interface ``Cache`` uses; workers call the methods below."""
        try:
            call = next(plan)
            while True:
                metadata = call.metadata
                try:
                    if metadata and self._core.phase is Phase.CONNECTING:
                        metadata = self._core.metadata_when_open(call, call.timeout or DEFAULT_TIMEOUT_S)
                    response = getattr(self._stub, call.method)(call.request, timeout=call.timeout, metadata=metadata)
                except grpc.RpcError as err:
                    error = from_rpc_error(err, target=self._core.target)
                    call = plan.throw(error)
                except BrokerUnavailable as unsent:  # no session opened in time: not sent
                    call = plan.throw(unsent)
                else:
                    call = plan.send(response)
        except StopIteration as stop:
            return stop.value

    def begin(self, plan: Plan[T]) -> InFlight[T] | None:
        """Send a one-call plan's call without waiting for its answer (a paged pool's
        grant ahead); None when it cannot go now (the session is still opening, and
        sending would wait for it). ``result()`` later gives what ``drive`` would have."""
        call = next(plan)
        if call.metadata and self._core.phase is Phase.CONNECTING:
            plan.close()
            return None
        future = getattr(self._stub, call.method).future(call.request, timeout=call.timeout, metadata=call.metadata)
        return InFlight(plan, future, self._core.target)

    def _recover(self) -> None:
        """Re-attach what may have survived the last lost session (``core.stranded``),
        each by its own Attach; what did not survive raises ``CacheLost`` on next use.
        Run by the session in a thread of its own once a new session is open."""
        for held in self._core.stranded():
            try:
                self.drive(self._core.view(held))
            except KvBrokerError as err:
                log.info("kvbroker cache %s not re-attached: %s", held.cache_id, err.message)

    def allocate(
        self,
        pool: str = "default",
        *,
        size_bytes: int | None = None,
        dtype: DTypeLike | None = None,
        shape: Sequence[int] | None = None,
        cache_id: str = "",
        model_name: str = "",
        priority: PriorityLike = None,
        pinned: bool = False,
        retain: bool = False,
        device: str = "",
        wait_timeout_ms: int = 0,
        size: SizeLike | None = None,
        size_mb: float | None = None,
        size_gb: float | None = None,
    ) -> Cache:
        """Place a new cache in ``pool`` and hold it.

        Give one size: ``size_bytes``, ``size`` (bytes or a string such as ``"512MiB"``),
        ``size_mb`` or ``size_gb`` (the kvcached guide's: mebibytes, gibibytes); or
        ``dtype`` and ``shape`` (then ``tensor()`` defaults to that view); with neither,
        the pool's default size. ``priority``: an integer, ``"low"`` (-100), ``"normal"``
        (0) or ``"high"`` (100); None: the pool's (``kvbroker_client/units.py``). The
        call's deadline is the client timeout plus ``wait_timeout_ms``.

        Raises:
            CacheExhausted: no room, even after waiting ``wait_timeout_ms``.
            CacheAlreadyExists, CacheNotFound (the pool), InvalidRequest.
            HandleError: this process cannot reach the new cache's memory (a host
                segment it cannot open: it does not share the broker's shm directory);
                the cache was released again, retained or not.
        """
        held = self.drive(self._core.allocate(
            pool, size_bytes=size_bytes, dtype=dtype, shape=shape, cache_id=cache_id,
            model_name=model_name, priority=priority, pinned=pinned, retain=retain,
            device=device, wait_timeout_ms=wait_timeout_ms, size=size, size_mb=size_mb, size_gb=size_gb,
            check=check_handle,
        ))  # fmt: skip
        return Cache(self, held, dtype=dtype, shape=shape)

    def attach(self, cache_id: str, *, wait_timeout_ms: int = 0) -> Cache:
        """Hold an existing cache (another process's) by id. An offloaded cache is
        restored into device memory first; with no room for it, the broker waits up to
        ``wait_timeout_ms`` (as ``allocate`` does; the call's deadline grows by as much).

        Raises:
            CacheNotFound, CacheEvicted; CacheExhausted: no room for an offloaded cache
            (at once without ``wait_timeout_ms``); AllocationTimeout: none within it.
        """
        return Cache(self, self.drive(self._core.attach(cache_id, wait_timeout_ms)))

    def release(self, cache_id: str, *, force: bool = False) -> bool:
        """Drop this client's hold on ``cache_id``; True when that freed the memory.
        Prefer ``Cache.release``; this form serves ids known only by name."""
        return self.drive(self._core.release_id(cache_id, force))

    def report_unmapped(self) -> None:
        """Report now the retired segments no tensor of this process uses any more (the
        session also does it in the background, every 0.2 s)."""
        for call in self._core.due(time.monotonic(), heartbeat=False):
            self.drive(self._core.unary(call.method, call.request))

    def stats(self) -> pb.StatsResponse:
        """Capacity, usage and fragmentation: in total, per device and per pool."""
        return self.drive(self._core.unary("Stats", pb.StatsRequest()))

    def summary(self) -> dict[str, Any]:
        """``stats()`` as the kvcached guide's ``get_pool_statistics()`` dict:
        ``total_capacity_gb``, ``total_utilization_pct``, ``avg_fragmentation_pct``,
        ``device_stats``, ``pool_stats``... (GiB and percent; ``kvbroker_client/summary.py``)."""
        return summarize(self.stats())

    def list_caches(
        self, pool: str = "", model_name: str = "", state: str | int | None = None, page_size: int = 0
    ) -> list[pb.Cache]:
        """Every cache matching the filters (empty: all), following the pages to the end.

        Cost: one RPC per ``page_size`` caches (the broker's default page when 0).
        """
        return self.drive(self._core.list_caches(list_caches_request(pool, model_name, state, page_size)))

    def sessions(self) -> pb.SessionsResponse:
        """Live sessions and what each holds (every session with the operator's list
        right, else this principal's own)."""
        return self.drive(self._core.unary("Sessions", pb.SessionsRequest()))

    def end_sessions(
        self, *, older_than_seconds: float = 0.0, session_ids: Sequence[str] = (), dry_run: bool = False
    ) -> pb.EndSessionsResponse:
        """End every session opened at least ``older_than_seconds`` ago (and among
        ``session_ids``, when given), as a lapsed lease would; ``dry_run`` only lists
        them. Operators only (the force_release right). Seed 004's ``cleanup_sessions``."""
        request = pb.EndSessionsRequest(older_than_seconds=older_than_seconds, session_ids=session_ids, dry_run=dry_run)
        return self.drive(self._core.unary("EndSessions", request))

    def defragment(
        self, device: str = "", pool: str = "", dry_run: bool = False, target_bytes: int = 0,
    ) -> pb.DefragmentResponse:
        """Compact ``device``/``pool`` now (empty: all), or only plan it with ``dry_run``.
        ``target_bytes``: only open a free extent that large per pool and device, with
        the fewest bytes moved (0: pack everything)."""
        request = pb.DefragmentRequest(device=device, pool=pool, dry_run=dry_run, target_bytes=target_bytes)
        return self.drive(self._core.unary("Defragment", request))

    def paged_pool(self, pool: str, *, grant_tokens: int = DEFAULT_GRANT_TOKENS, populate: bool = False) -> PagedPool:
        """A paged KV pool (``[pools.kv]``), its arena mapped once: per-layer tensors,
        sequences, token appends without RPCs (``kvbroker_client/paged.py``).

        Raises:
            CacheNotFound: ``pool`` is not a paged pool of this broker.
        """
        return PagedPool(self, pool, grant_tokens=grant_tokens, populate=populate)

    def close(self) -> None:
        """Release every cache this client still holds (best effort), end the session,
        close the channel. Idempotent. Views already built are re-mapped to private
        memory as each cache is released (``kvbroker_client/revoke.py``)."""
        if self._core.closed:
            return
        self.drive(self._core.close())
        if self._session is not None:
            self._session.stop()
        self._channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, session_id={self.session_id!r})"


class _Session:
    """The session's two daemon threads: the Watch loop and the schedule."""

    def __init__(self, core: ClientCore, stub: Any, recover: Any,
                 listeners: list[Callable[[pb.WatchEvent], None]]) -> None:
        self._core = core
        self._listeners = listeners
        self._stub = stub
        self._recover = recover  # re-attaches the stranded records (BrokerClient._recover)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self.first_attempt = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch_loop, name="kvbroker-watch", daemon=True),
            threading.Thread(target=self._schedule_loop, name="kvbroker-heartbeat", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _watch_loop(self) -> None:
        core = self._core
        while True:
            delay = core.reconnect_delay()
            if self._stop.wait(delay) if delay else self._stop.is_set():
                return
            call = core.watch_call()
            if call is None:
                return
            stream = self._stub.Watch(call.request, metadata=call.metadata, wait_for_ready=core.watch_waits_for_ready())
            with self._lock:
                if self._stop.is_set():
                    stream.cancel()
                    return
                self._stream = stream
            lost_before, detail = core.sessions_lost, "the broker ended it"
            try:
                for event in stream:
                    alive = core.on_event(event, call.generation, time.monotonic())
                    if event.sequence_id:
                        for listener in list(self._listeners):
                            listener(event)
                    if core.phase is Phase.OPEN:
                        self.first_attempt.set()
                    if event.kind == pb.EVENT_KIND_SESSION_OPENED and core.sessions_lost:
                        threading.Thread(target=self._recover, name="kvbroker-reattach", daemon=True).start()
                    if not alive:
                        break
            except grpc.RpcError as err:
                detail = f"{err.code().name}: {err.details()}"
            finally:
                stream.cancel()
            core.on_stream_end(call.generation, detail, time.monotonic())
            self.first_attempt.set()
            if core.sessions_lost != lost_before:
                log.warning("kvbroker session lost (%s); opening session %s", core.last_loss, core.session_id)

    def _schedule_loop(self) -> None:
        while not self._stop.wait(UNMAP_POLL_SECONDS):
            for call in self._core.due(time.monotonic()):
                try:
                    getattr(self._stub, call.method)(call.request, timeout=call.timeout, metadata=call.metadata)
                except grpc.RpcError as err:
                    log.debug("kvbroker %s failed: %s", call.method, err.details())

    def stop(self) -> None:
        """End the stream (the broker then ends the session) and stop both threads."""
        with self._lock:
            self._stop.set()
            if self._stream is not None:
                self._stream.cancel()
        for thread in self._threads:
            thread.join(timeout=5)
