"""Running compactions: plan in the core, copy in a thread, commit in the core.

Protocol (``kvbroker/core/broker.py``): ``Broker.begin_compaction(plan)`` freezes the plan's arenas
(nothing is placed in them, nothing in them is evicted, moved caches are MOVING); the
bytes are copied with the loop free; ``Broker.commit(plan, completed)`` applies the
moves whose bytes arrived and aborts the rest, then the engine frees the segments the
commit emptied. Meanwhile:

- an allocation of a pool with a compaction in flight waits for it (``quiet``), since
  the core would refuse to place in a frozen arena;
- an attach or pin of a moving cache waits for it (``moving``), then retries;
- a compaction runs in its own task, never cancelled by a caller (callers await it
  shielded): a copy cannot be stopped half-way, and the commit must follow it.

A failed copy (``CopyError(completed=k)``) commits the first k moves: the plan orders
moves so that any prefix is a consistent layout, and the backend guarantees the other
caches' bytes are intact at their sources. Moves are copied per device in plan order,
one thread call per run of consecutive moves on the same device, so "the first k" is a
prefix of the plan. Any other exception aborts the moves not yet copied.

Cost on the loop: O(moves) to begin and to commit; the copy itself is off the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvbroker.core import Broker, CompactionPlan, Move, SegmentInfo
from kvbroker.engine.devicework import DeviceWork
from kvbroker.engine.ports import Observer
from kvbroker.memory.backend import CopyError

log = logging.getLogger(__name__)

Settle = Callable[[Sequence[SegmentInfo], bool], None]


class CompactionOutcome(NamedTuple):
    """What one compaction did: ``completed`` of the plan's moves were committed."""

    completed: int
    bytes_moved: int
    segments_freed: int
    error: BaseException | None


class Compactions:
    """The compactions in flight, by arena and by moving cache.

    Args:
        broker: the core.
        device: runs the copies.
        observer: telemetry hooks.
        settle: the engine's "after a core mutation" step (deliver events, free the
            given segments, wake waiting allocations when memory was freed).
    """

    def __init__(self, broker: Broker, device: DeviceWork, observer: Observer, settle: Settle) -> None:
        self._broker = broker
        self._device = device
        self._observer = observer
        self._settle = settle
        self._arenas: dict[tuple[str, str], asyncio.Event] = {}  # (pool, device) -> done
        self._moving: dict[str, asyncio.Event] = {}  # cache id -> done

    def __bool__(self) -> bool:
        return bool(self._arenas)

    def moving(self, cache_id: str) -> asyncio.Event | None:
        """The event set when the compaction moving ``cache_id`` ends (None: not moving)."""
        return self._moving.get(cache_id) if self._moving else None

    async def quiet(self, pool: str | None = None) -> None:
        """Until no compaction of ``pool`` (of any pool when None) is in flight. Does not
        suspend when none is (the allocation fast path)."""
        while self._arenas:
            busy = [e for (p, _), e in self._arenas.items() if pool is None or p == pool]
            if not busy:
                return
            await busy[0].wait()

    async def run(self, plan: CompactionPlan) -> CompactionOutcome:
        """Begin ``plan`` and wait (shielded) for its commit. A cancelled caller leaves
        the compaction running to its commit."""
        return await asyncio.shield(self.start(plan))

    def start(self, plan: CompactionPlan) -> asyncio.Task[CompactionOutcome]:
        """Freeze the plan's arenas in the core and start copying (in a task)."""
        segment = self._broker.segment
        runs: list[tuple[str, list[Move]]] = []
        arenas = set()
        for move in plan.moves:
            info = segment(move.source.segment_id)
            arenas.add((info.pool, info.device_id))
            if runs and runs[-1][0] == info.device_id:
                runs[-1][1].append(move)
            else:
                runs.append((info.device_id, [move]))
        self._broker.begin_compaction(plan)
        done = asyncio.Event()
        for arena in arenas:
            self._arenas[arena] = done
        for move in plan.moves:
            self._moving[move.cache_id] = done
        task = asyncio.get_running_loop().create_task(self._copy_and_commit(plan, runs, arenas, done))
        self._device.track(task)
        return task

    async def _copy_and_commit(
        self, plan: CompactionPlan, runs: list[tuple[str, list[Move]]],
        arenas: set[tuple[str, str]], done: asyncio.Event,
    ) -> CompactionOutcome:  # fmt: skip
        completed, error = 0, None
        attributes = {"kvbroker.caches": plan.caches_moved, "kvbroker.nbytes": plan.bytes_moved}
        try:
            with self._observer.span("compaction", attributes):
                for device_id, moves in runs:
                    nbytes = sum(m.destination.nbytes for m in moves)
                    with self._observer.span("copy", {"kvbroker.device": device_id, "kvbroker.nbytes": nbytes}):
                        started = time.perf_counter()
                        try:
                            await self._device.copy(device_id, moves)
                        except CopyError as err:
                            completed += err.completed
                            raise
                        self._observer.compaction_copied(device_id, nbytes, time.perf_counter() - started)
                    completed += len(moves)
        except Exception as err:  # reported in the outcome; callers re-raise it
            error = err
            log.error("compaction copy failed after %d of %d moves: %r", completed, len(plan.moves), err)
        # (A CancelledError propagates without a commit: the engine never cancels a
        # compaction, only a loop being torn down does, and the copy thread may still run.)
        retired = self._broker.commit(plan, None if completed == len(plan.moves) else completed)
        for arena in arenas:
            if self._arenas.get(arena) is done:
                del self._arenas[arena]
        for move in plan.moves:
            if self._moving.get(move.cache_id) is done:
                del self._moving[move.cache_id]
        done.set()
        self._settle(retired, True)
        moved = sum(m.destination.nbytes for m in plan.moves[:completed])
        return CompactionOutcome(completed, moved, len(retired), error)
