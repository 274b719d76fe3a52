"""The engine's background tick: leases, idle segments and reclamation.

It decides nothing of its own: every ``tick_seconds`` it ends the sessions whose lease
ran out (their streams are told ``SessionEnded(LEASE_EXPIRED)``), gives back segments
empty for ``segment_idle_seconds`` (draining mapped ones), and runs the core's
reclamation above ``gc_threshold``. Each step is one synchronous core call bounded so
the loop is never held for long (at most ``reclaim_batch`` evictions per tick; a
session's end costs O(its caches and segments)); freeing the retired segments happens
in a device thread (``DeviceWork.free_soon``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvbroker.core import Broker, SegmentInfo
from kvbroker.engine.sessions import SessionRegistry
from kvbroker.wire import SessionEndReason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """Timing of the engine's background work (see the module docstring)."""

    lease_seconds: float = 10.0
    segment_idle_seconds: float = 30.0
    tick_seconds: float = 0.25
    reclaim_batch: int = 64


class Background:
    """The tick, and the task that runs it.

    Args:
        end_session: ends one session now (the engine's, so it is counted and logged).
        settle: the engine's "after a core mutation" step.
    """

    def __init__(
        self, broker: Broker, sessions: SessionRegistry, settings: EngineSettings,
        end_session: Callable[[str, SessionEndReason], object],
        settle: Callable[[Sequence[SegmentInfo], bool], None],
    ) -> None:  # fmt: skip
        self._broker = broker
        self._sessions = sessions
        self._settings = settings
        self._end_session = end_session
        self._settle = settle
        self._task: asyncio.Task | None = None

    def tick(self) -> None:
        """One round of background work (synchronous: core calls only)."""
        for session_id in self._sessions.expired():
            self._end_session(session_id, SessionEndReason.LEASE_EXPIRED)
        retired = self._broker.retire_idle_segments(self._settings.segment_idle_seconds)
        evicted = self._broker.reclaim(max_victims=self._settings.reclaim_batch)
        self._settle(retired, bool(retired or evicted))

    def start(self) -> None:
        """Start ticking (call from the running loop). Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.tick_seconds)
            try:
                self.tick()
            except Exception:
                log.exception("background tick failed")
