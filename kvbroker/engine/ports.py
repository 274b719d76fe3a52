"""What the engine tells the outside world, as protocols: telemetry's ``Observer``.

The engine is below telemetry in the layers (pyproject's import-linter contract), so it
cannot import ``kvbroker.telemetry``; telemetry implements ``Observer`` instead, and the
value types it reports back (``RpcStats``) live here, where both can see them.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

from kvbroker.wire import SessionEndReason


class MethodStats(NamedTuple):
    """Latency and errors of one RPC method over ``RpcStats.window_seconds``."""

    method: str
    calls: int
    errors_by_code: tuple[tuple[str, int], ...]  # (status code name, calls), non-OK only
    p50_seconds: float
    p95_seconds: float
    p99_seconds: float
    calls_total: int = 0  # every call since the start, not only the window's


class LiveFigures(NamedTuple):
    """What the engine knows beyond the core's stats (Stats RPC, gauges): live sessions,
    and per pool the allocations queued for room now and every one queued so far, and per
    (pool, offload tier) the bytes of offloaded caches the tier holds."""

    sessions: int
    waiting: Mapping[str, int]
    waits: Mapping[str, int]
    #: Per paged pool (``kvbroker.engine.paged``): its ``kvbroker.core.paged.PagedStats``.
    paged: Mapping[str, Any] = {}
    #: Per (pool, offload tier): the bytes of offloaded caches the tier holds.
    offloaded: Mapping[tuple[str, str], int] = {}


class RpcStats(NamedTuple):
    window_seconds: float
    methods: tuple[MethodStats, ...]


class Span(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


class Observer(Protocol):
    """What the engine tells telemetry (``kvbroker.telemetry`` implements it).

    Called on the event loop; every method returns in about a microsecond and never
    raises. ``span`` opens a tracing span that is the current one inside the ``with``
    block (attribute keys ``kvbroker.pool``, ``kvbroker.device``, ``kvbroker.nbytes``,
    ``kvbroker.outcome``...); an exception leaving the block is recorded on it.
    """

    def span(self, name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[Span]: ...
    def allocation_finished(self, pool: str, error: BaseException | None) -> None: ...
    def allocation_waited(self, pool: str, seconds: float) -> None: ...
    def compaction_copied(self, device: str, nbytes: int, seconds: float) -> None: ...
    def offload_finished(self, pool: str, tier: str, outcome: str, nbytes: int, seconds: float) -> None: ...
    def restore_finished(self, pool: str, tier: str, outcome: str, seconds: float) -> None: ...
    def session_opened(self) -> None: ...
    def session_reclaimed(self, reason: SessionEndReason) -> None: ...
    def rpc_stats(self) -> RpcStats | None: ...


class _NullSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class NullObserver:
    """Telemetry off: every hook does nothing (one method call each)."""

    _span = _NullSpan()

    def span(self, name: str, attributes: Mapping[str, Any]) -> _NullSpan:
        return self._span

    def allocation_finished(self, pool: str, error: BaseException | None) -> None:
        pass

    def allocation_waited(self, pool: str, seconds: float) -> None:
        pass

    def compaction_copied(self, device: str, nbytes: int, seconds: float) -> None:
        pass

    def offload_finished(self, pool: str, tier: str, outcome: str, nbytes: int, seconds: float) -> None:
        pass

    def restore_finished(self, pool: str, tier: str, outcome: str, seconds: float) -> None:
        pass

    def session_opened(self) -> None:
        pass

    def session_reclaimed(self, reason: SessionEndReason) -> None:
        pass

    def rpc_stats(self) -> RpcStats | None:
        return None
