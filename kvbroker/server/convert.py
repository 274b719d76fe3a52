"""Protobuf <-> domain translation, and the one table of domain errors -> status codes.

Pure functions: no state, no I/O. Every rule about a field's shape that the wire adds
(dtype and shape, optional priority, empty strings meaning "unset") lives here, and every
error names the wire field, so ``INVALID_ARGUMENT`` tells the caller what to fix.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kvbroker.core import (
    AllocationRequest,
    BrokerStats,
    CacheInfo,
    CacheState,
    Evicted,
    Event,
    EventKind,
    LimitsChange,
    PoolSpec,
    Usage,
)
from kvbroker.core.errors import (
    AlreadyExists,
    BrokerError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvbroker.core.paged import OutOfTokens
from kvbroker.engine import (
    CacheHandle,
    DefragmentResult,
    EngineStatus,
    RpcStats,
    SessionEnded,
    SessionEvent,
    SessionOpened,
    SessionView,
)
from kvbroker.memory.backend import CudaHandle, HostHandle
from kvbroker.persistence import BudgetExceeded, DiskFull, PersistenceError
from kvbroker.security import PermissionDenied, Unauthenticated
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.wire import DTYPE_BY_NAME, DTYPE_BY_VALUE, ID_PATTERN

#: The one mapping of domain errors to gRPC status codes. Anything else is a bug:
#: INTERNAL, logged with its traceback by the servicer.
STATUS_FOR_ERROR: dict[type[BrokerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfTokens: grpc.StatusCode.RESOURCE_EXHAUSTED,  # "out of tokens: N tokens requested, M tokens free"
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    PersistenceError: grpc.StatusCode.ABORTED,  # the previous checkpoint generation stays current
    BudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DiskFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

_STATE_TO_PB = {
    CacheState.RESIDENT: pb.CACHE_STATE_RESIDENT,
    CacheState.EVICTED: pb.CACHE_STATE_EVICTED,
    CacheState.PENDING: pb.CACHE_STATE_PENDING,
    CacheState.OFFLOADED: pb.CACHE_STATE_OFFLOADED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}

MAX_WAIT_TIMEOUT_MS = 3_600_000
#: Evict and SetPoolLimits list at most this many evicted ids (their counts are exact).
MAX_LISTED_IDS = 1000
MAX_SHAPE_DIMS = 16
#: Error messages echo what the client sent (pool names, model names, ids): at most this
#: many characters of message per field, so a 4 MB name never comes back whole.
MAX_DETAIL_CHARS = 200
#: ... and at most this many for a message that names no field.
MAX_MESSAGE_CHARS = 2 * MAX_DETAIL_CHARS


def status_for(err: BrokerError) -> grpc.StatusCode:
    """The status code of a domain error (the most specific class in the table)."""
    for cls in type(err).__mro__:
        code = STATUS_FOR_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def error_details(err: BrokerError) -> str:
    """The status details of a domain error: its message, capped (``MAX_DETAIL_CHARS``
    per field, ``MAX_MESSAGE_CHARS`` in all), since it may echo client input."""
    text = str(err)
    field = getattr(err, "field", None)
    if isinstance(field, str) and text.startswith(f"{field}: "):
        return f"{_cap(field, 64)}: {_cap(text[len(field) + 2:], MAX_DETAIL_CHARS)}"
    return _cap(text, MAX_MESSAGE_CHARS)


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _dtype_value(name: str) -> int:
    wire_dtype = DTYPE_BY_NAME.get(name)
    return pb.DTYPE_UNSPECIFIED if wire_dtype is None else wire_dtype.value


# -- requests -------------------------------------------------------------------------


def allocation_request(msg: pb.AllocateRequest, holder: str) -> tuple[AllocationRequest, float]:
    """Decode an ``AllocateRequest``; returns the core request and the wait in seconds.

    Size rules: ``size_bytes``, or ``dtype`` + ``shape`` (size = element size x product),
    or neither (the pool's default size, decided by the core). Both given must agree.
    """
    shape = tuple(msg.shape)
    dtype_name = ""
    if msg.dtype != pb.DTYPE_UNSPECIFIED:
        wire_dtype = DTYPE_BY_VALUE.get(msg.dtype)
        if wire_dtype is None:
            raise InvalidArgument("dtype", f"unknown dtype value {msg.dtype}")
        dtype_name, itemsize = wire_dtype.name, wire_dtype.itemsize
    nbytes = msg.size_bytes
    if shape:
        if not dtype_name:
            raise InvalidArgument("dtype", "is required when shape is given")
        if len(shape) > MAX_SHAPE_DIMS:
            raise InvalidArgument("shape", f"has {len(shape)} dimensions (at most {MAX_SHAPE_DIMS})")
        if any(n <= 0 for n in shape):
            raise InvalidArgument("shape", f"dimensions must be positive, got {list(shape)}")
        from_shape = itemsize * math.prod(shape)
        if nbytes and nbytes != from_shape:
            raise InvalidArgument(
                "size_bytes",
                f"{nbytes} disagrees with dtype {dtype_name} and shape {list(shape)} "
                f"({from_shape} bytes); give one or the other",
            )
        nbytes = from_shape
    elif dtype_name and nbytes % itemsize:
        raise InvalidArgument(
            "size_bytes", f"{nbytes} is not a multiple of the {dtype_name} element size ({itemsize})"
        )
    wait_s = wait_seconds(msg.wait_timeout_ms)
    request = AllocationRequest(
        pool=msg.pool,
        nbytes=nbytes,
        holder=holder,
        cache_id=msg.cache_id or None,
        model_name=msg.model_name,
        priority=msg.priority if msg.HasField("priority") else None,
        pinned=msg.pinned,
        retain=msg.retain,
        device_hint=msg.device or None,
        dtype=dtype_name,
        shape=shape,
    )
    return request, wait_s


def wait_seconds(wait_timeout_ms: int) -> float:
    """A request's ``wait_timeout_ms`` in seconds, checked against ``MAX_WAIT_TIMEOUT_MS``."""
    if wait_timeout_ms > MAX_WAIT_TIMEOUT_MS:
        raise InvalidArgument("wait_timeout_ms", f"must be at most {MAX_WAIT_TIMEOUT_MS}")
    return wait_timeout_ms / 1000.0


def cache_state(value: int) -> CacheState | None:
    """Decode a state filter (UNSPECIFIED: no filter)."""
    if value == pb.CACHE_STATE_UNSPECIFIED:
        return None
    state = _STATE_FROM_PB.get(value)
    if state is None:
        raise InvalidArgument("state", f"unknown cache state value {value}")
    return state


def required_id(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    return value


def end_sessions_request(msg: pb.EndSessionsRequest) -> tuple[float, frozenset[str]]:
    """EndSessions' criteria, checked: an age in seconds and session ids, at least one."""
    age = msg.older_than_seconds
    if not (math.isfinite(age) and age >= 0):
        raise InvalidArgument("older_than_seconds", f"must be a finite number of seconds >= 0, got {age}")
    for session_id in msg.session_ids:
        if not ID_PATTERN.fullmatch(session_id):
            raise InvalidArgument("session_ids", f"{session_id[:64]!r} does not match {ID_PATTERN.pattern}")
    if age == 0 and not msg.session_ids:
        raise InvalidArgument("older_than_seconds", "give an age above 0 or session_ids: ending every session is refused")
    return age, frozenset(msg.session_ids)


def pool_limits(msg: pb.SetPoolLimitsRequest) -> dict[str, int | None]:
    """The limits a ``SetPoolLimitsRequest`` sets (None: unset, kept)."""
    return {
        name: getattr(msg, name) if msg.HasField(name) else None for name in ("max_bytes", "min_bytes", "priority")
    }


# -- responses ------------------------------------------------------------------------


def _timestamp(unix_seconds: float) -> Timestamp | None:
    if not unix_seconds:
        return None
    seconds = int(unix_seconds)
    return Timestamp(seconds=seconds, nanos=int((unix_seconds - seconds) * 1e9))


def cache_message(info: CacheInfo, *, holders: bool = False) -> pb.Cache:
    """A cache on the wire; ``holders``: with the ids of its holders (operators only)."""
    return pb.Cache(
        cache_id=info.cache_id,
        pool=info.pool,
        model_name=info.model_name,
        nbytes=info.nbytes,
        reserved_bytes=info.reserved_bytes,
        device=info.device_id,
        state=_STATE_TO_PB[info.state],
        epoch=info.epoch,
        pinned=info.pinned,
        pin_count=info.pin_count,
        holder_count=len(info.holders),
        retain=info.retain,
        priority=info.priority,
        dtype=_dtype_value(info.dtype),
        shape=info.shape,
        created_at=_timestamp(info.created_at),
        last_access_at=_timestamp(info.last_access_at),
        access_count=info.access_count,
        holders=sorted(info.holders) if holders else (),
    )


def handle_message(handle: CacheHandle) -> pb.Handle:
    msg = pb.Handle(
        instance_id=handle.instance_id,
        server_pid=handle.server_pid,
        segment_id=handle.segment.segment_id,
        segment_generation=handle.segment.generation,
        byte_offset=handle.byte_offset,
        nbytes=handle.nbytes,
        epoch=handle.epoch,
    )
    backend = handle.backend
    if isinstance(backend, HostHandle):
        msg.host.CopyFrom(
            pb.HostSegmentHandle(
                shm_name=backend.shm_name,
                size_bytes=backend.size_bytes,
                st_dev=backend.st_dev,
                st_ino=backend.st_ino,
                shm_dir=backend.shm_dir,
            )
        )
    elif isinstance(backend, CudaHandle):
        msg.cuda.CopyFrom(
            pb.CudaSegmentHandle(
                device_uuid=backend.device_uuid,
                torch_version=backend.torch_version,
                mem_handle=backend.mem_handle,
                storage_size_bytes=backend.storage_size_bytes,
                storage_offset_bytes=backend.storage_offset_bytes,
                ref_counter_handle=backend.ref_counter_handle,
                ref_counter_offset=backend.ref_counter_offset,
                event_handle=backend.event_handle,
                event_sync_required=backend.event_sync_required,
            )
        )
    else:
        raise TypeError(f"unknown segment handle {type(backend).__name__}")
    return msg


def usage_message(usage: Usage, allocation_count: int, eviction_count: int) -> pb.Usage:
    return pb.Usage(
        total_capacity_bytes=usage.capacity_bytes,
        total_allocated_bytes=usage.allocated_bytes,
        reserved_bytes=usage.reserved_bytes,
        pinned_bytes=usage.pinned_bytes,
        free_bytes=usage.free_bytes,
        largest_free_extent_bytes=usage.largest_free_extent_bytes,
        utilization_ratio=usage.utilization_ratio,
        fragmentation_ratio=usage.fragmentation_ratio,
        active_caches=usage.active_caches,
        segments=usage.segments,
        allocation_count=allocation_count,
        eviction_count=eviction_count,
        pending_caches=usage.pending_caches,
        pinned_caches=usage.pinned_caches,
        idle_retained_caches=usage.idle_retained_caches,
        fragmentation_within_segments_ratio=usage.fragmentation_within_segments_ratio,
        fragmentation_across_segments_ratio=usage.fragmentation_across_segments_ratio,
    )


def stats_message(stats: BrokerStats, status: EngineStatus) -> pb.StatsResponse:
    """The Stats reply: the core's figures, this daemon run, and (with telemetry) the
    recent RPC latencies and errors."""
    total = stats.total
    live = status.live
    response = pb.StatsResponse(
        total_capacity_bytes=total.capacity_bytes,
        total_allocated_bytes=total.allocated_bytes,
        utilization_ratio=total.utilization_ratio,
        fragmentation_ratio=total.fragmentation_ratio,
        active_caches=total.active_caches,
        allocation_count=stats.allocation_count,
        eviction_count=stats.eviction_count,
        pinned_bytes=total.pinned_bytes,
        free_bytes=total.free_bytes,
        largest_free_extent_bytes=total.largest_free_extent_bytes,
        devices=[
            pb.DeviceStats(
                device=d.device_id,
                usage=usage_message(d.usage, d.allocation_count, d.eviction_count),
            )
            for d in stats.devices
        ],
        pools=[
            pb.PoolStats(
                pool=p.pool,
                usage=usage_message(p.usage, p.allocation_count, p.eviction_count),
                min_bytes=p.min_bytes,
                max_bytes=p.max_bytes,
                priority=p.priority,
                eviction_policy=p.eviction_policy,
                waiting_allocations=live.waiting.get(p.pool, 0),
                allocation_waits=live.waits.get(p.pool, 0),
                offloaded_host_bytes=live.offloaded.get((p.pool, "host"), 0),
                offloaded_disk_bytes=live.offloaded.get((p.pool, "disk"), 0),
            )
            for p in stats.pools
        ],
        version=status.version,
        instance_id=status.instance_id,
        uptime_seconds=status.uptime_seconds,
        sessions=live.sessions,
    )
    return _add_rpc_stats(response, status.rpc)


def _add_rpc_stats(response: pb.StatsResponse, rpc: RpcStats | None) -> pb.StatsResponse:
    """Fill ``methods`` and ``window_seconds`` (left empty when telemetry is off)."""
    if rpc is not None:
        response.window_seconds = rpc.window_seconds
        for m in rpc.methods:
            response.methods.add(
                method=m.method, calls=m.calls, errors=sum(n for _, n in m.errors_by_code),
                p50_seconds=m.p50_seconds, p95_seconds=m.p95_seconds, p99_seconds=m.p99_seconds,
                errors_by_code=dict(m.errors_by_code), calls_total=m.calls_total,
            )  # fmt: skip
    return response


def defragment_message(result: DefragmentResult) -> pb.DefragmentResponse:
    before, after = result.before, result.after
    return pb.DefragmentResponse(
        caches_moved=result.caches_moved,
        bytes_moved=result.bytes_moved,
        fragmentation_before=result.fragmentation_before,
        fragmentation_after=result.fragmentation_after,
        segments_freed=result.segments_freed,
        duration_seconds=result.duration_seconds,
        dry_run=result.dry_run,
        fragmentation_within_segments_before=before.within_segments,
        fragmentation_within_segments_after=after.within_segments,
        fragmentation_across_segments_before=before.across_segments,
        fragmentation_across_segments_after=after.across_segments,
        free_bytes_in_segments=before.free_bytes,
        largest_free_extent_before_bytes=before.largest_free_extent,
        largest_free_extent_after_bytes=after.largest_free_extent,
        segments_freed_bytes=result.segments_freed_bytes,
        moves=[
            pb.PlannedMove(
                cache_id=m.cache_id, pool=m.pool, device=m.device_id, nbytes=m.source.nbytes,
                from_segment_id=m.source.segment_id, from_offset=m.source.offset,
                to_segment_id=m.destination.segment_id, to_offset=m.destination.offset,
            )
            for m in result.moves
        ],
        moves_total=result.moves_total,
        paged=result.paged,
        block_moves=[pb.PagedBlockMove(sequence_id=s, from_block=f, to_block=t) for s, f, t in result.block_moves],
    )


def evict_message(result: Evicted) -> pb.EvictResponse:
    return pb.EvictResponse(
        caches_evicted=len(result.cache_ids), bytes_evicted=result.nbytes,
        cache_ids=result.cache_ids[:MAX_LISTED_IDS], caches_kept=result.kept,
    )  # fmt: skip


def _limits(spec: PoolSpec) -> pb.PoolLimits:
    return pb.PoolLimits(max_bytes=spec.max_bytes or 0, min_bytes=spec.min_bytes, priority=spec.priority)


def limits_message(pool: str, change: LimitsChange) -> pb.SetPoolLimitsResponse:
    return pb.SetPoolLimitsResponse(
        pool=pool, before=_limits(change.before), after=_limits(change.after),
        caches_evicted=len(change.evicted), bytes_evicted=change.evicted_bytes,
        cache_ids=change.evicted[:MAX_LISTED_IDS],
        segments_retired=len(change.retired), bytes_retired=sum(s.nbytes for s in change.retired),
        segments_draining=len(change.draining), bytes_draining=sum(s.nbytes for s in change.draining),
        dry_run=change.dry_run,
    )  # fmt: skip


_EVENT_KIND_TO_PB = {
    EventKind.EVICTED: pb.EVENT_KIND_EVICTED,
    EventKind.MOVED: pb.EVENT_KIND_MOVED,
    EventKind.SEGMENT_RETIRED: pb.EVENT_KIND_SEGMENT_RETIRED,
    EventKind.SHUTTING_DOWN: pb.EVENT_KIND_SHUTTING_DOWN,
}


def session_event_message(event: SessionEvent) -> pb.WatchEvent:
    """One item of a Watch stream: SESSION_OPENED first, the core's events, and
    SESSION_ENDED (with the ``wire.SessionEndReason`` value) when the broker ended it."""
    if isinstance(event, SessionOpened):
        return pb.WatchEvent(
            kind=pb.EVENT_KIND_SESSION_OPENED, session_id=event.session_id,
            lease_seconds=event.lease_seconds, instance_id=event.instance_id,
            session_secret=event.secret,
        )  # fmt: skip
    if isinstance(event, SessionEnded):
        return pb.WatchEvent(kind=pb.EVENT_KIND_SESSION_ENDED, reason=event.reason.value)
    return event_message(event)


def event_message(event: Event) -> pb.WatchEvent:
    return pb.WatchEvent(
        kind=_EVENT_KIND_TO_PB[event.kind],
        cache_id=event.cache_id,
        epoch=event.epoch,
        segment_id=max(event.segment_id, 0),
        segment_generation=event.segment_generation,
        reason=event.reason,
        sequence_id=event.sequence_id,
    )


def session_message(view: SessionView) -> pb.SessionInfo:
    peer = view.peer
    return pb.SessionInfo(
        session_id=view.session_id, principal=view.principal, client_name=view.client_name,
        pid=view.pid, host=view.host, peer_known=peer is not None,
        peer_uid=peer.uid if peer else 0, peer_pid=peer.pid if peer else 0,
        age_seconds=view.age_seconds, lease_remaining_seconds=view.lease_remaining_seconds,
        watching=view.watching, holds=view.holds, pins=view.pins, mapped_segments=view.mapped_segments,
    )  # fmt: skip
