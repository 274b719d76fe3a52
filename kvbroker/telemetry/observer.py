"""The engine's ``Observer``, implemented: metric hooks go to the ``Recorder``, spans to
an OpenTelemetry tracer when tracing is on.

Without a tracer, ``span`` hands back one shared no-op span, so the engine's ``with``
blocks cost a method call. With one, each span is a child of the current span (the RPC's
server span, set by the interceptor in the call's task) named ``kvbroker.<name>``; an
exception leaving the block is recorded on it and sets its status to ERROR (the
OpenTelemetry SDK's default for ``start_as_current_span``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvbroker.engine import NullObserver, RpcStats
from kvbroker.telemetry.recorder import Recorder


class TelemetryObserver:
    """Hooks bound straight to the recorder's methods (no forwarding call on the hot path)."""

    def __init__(self, recorder: Recorder, tracer: Any = None) -> None:
        self.recorder = recorder
        self.tracer = tracer
        self.allocation_finished = recorder.allocation_finished
        self.allocation_waited = recorder.allocation_waited
        self.compaction_copied = recorder.compaction_copied
        self.offload_finished = recorder.offload_finished
        self.restore_finished = recorder.restore_finished
        self.session_opened = recorder.session_opened
        self.session_reclaimed = recorder.session_reclaimed
        self.checkpoint_finished = recorder.checkpoint_finished  # kvbroker.engine.PersistenceObserver
        self.generation_rejected = recorder.generation_rejected
        self.caches_restored = recorder.caches_restored
        if tracer is None:
            self.span = NullObserver().span

    def span(self, name: str, attributes: Mapping[str, Any]):
        return self.tracer.start_as_current_span(f"kvbroker.{name}", attributes=attributes)

    def rpc_stats(self) -> RpcStats:
        return self.recorder.rpc_stats()
