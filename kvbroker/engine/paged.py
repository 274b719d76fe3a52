"""Paged KV pools: one block arena per pool, handed out to sequences block by block.

A paged pool's memory is **one cache**, its *arena*, allocated through the ordinary path
when the daemon starts (``create_arenas``): pinned and retained, held by the daemon
(``ARENA_HOLDER``), so it is never evicted, moved or freed while the daemon runs, and
every existing piece serves it unchanged: its handle (shm or CUDA IPC), a client's
mapping (once per process), Stats and telemetry. The arena is laid out as
``kvbroker.kvlayout`` says: per layer, ``(2, num_blocks, block_tokens, num_kv_heads,
head_dim)``, layer ``i`` at ``i * layout.layer_bytes(num_blocks)``.

Which blocks belong to which sequence is ``kvbroker.core.paged.PagedArena``'s, one per
pool, mutated only in synchronous sections on the loop (as the engine's core is). Bytes
move here only in a defragment (below): a sequence's blocks are integers; the client
writes K/V through its own mapping. Prefaulting (``prefault``) zeroes the whole arena
once in a device thread at creation, so that every page exists before the first token
is written.

Out of blocks, a call picks its strategy (``OOM_STRATEGIES``, the cortexstream guide's):

- ``reject``: ``OutOfTokens`` (RESOURCE_EXHAUSTED, with tokens requested and free) at once;
- ``reduce``: the sequence reserves its whole ``max_tokens`` up front (so it never runs
  out while generating) and, when that does not fit, gets the largest ``max_tokens``
  that does, all free blocks (exact: better than the seed's halving, which may stop up to
  half below what fits); refused only when the prompt itself does not fit;
- ``wait``: waits up to its timeout for a sequence to be freed, then ``DeadlineExceeded``.

Before refusing, every strategy evicts unpinned sequences of a *lower* priority (least
recently used first): the pool's pressure ladder at sequence granularity. Their holders
get an EVICTED event carrying the sequence id.

Defragmenting (``defragment``; ``kvbroker defrag --pool P``): the core plans block copies
that put every unpinned sequence in one run (``kvbroker.core.paged_defrag``), a worker
thread copies every layer's K and V of those blocks in the arena, then the core commits
(``PagedArena.relocate``) and the moved sequences' holders get a MOVED event with the
sequence id and its new epoch. While the copy runs, every call that reads or changes the
pool's sequences (allocate, extend/report, attach, free, pin) waits for the commit, so no
block changes owner under the copy. What no RPC fences is a client's write into blocks
it was already granted: a token written into an unpinned sequence's old blocks during the
copy may not reach the new ones. So a worker pins a sequence it is writing (pinned
sequences never move), or the operator defragments while writers are idle, as with an
unpinned cache under compaction (``with cache.pinned()``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from kvbroker.core import AllocationRequest, CacheInfo, Event, EventKind, Fragmentation, validate_id
from kvbroker.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from kvbroker.core.paged import OutOfTokens, PagedArena, PagedStats, SequenceView
from kvbroker.core.paged_defrag import plan_defragment
from kvbroker.engine.engine import Engine
from kvbroker.engine.handles import CacheHandle
from kvbroker.engine.paged_defrag import block_moves
from kvbroker.engine.views import DefragmentResult
from kvbroker.kvlayout import KvLayout

log = logging.getLogger(__name__)

#: The daemon's own (sessionless) holder of every arena.
ARENA_HOLDER = "~kvbroker-paged"
OOM_STRATEGIES = ("reject", "reduce", "wait")
#: Block copies listed in a paged defragment's result (the rest are counted).
MAX_LISTED_BLOCK_MOVES = 1000


@dataclass(frozen=True, slots=True)
class PagedPoolSpec:
    """A paged pool as the daemon resolved it from ``[pools.kv]``."""

    pool: str
    layout: KvLayout
    num_blocks: int
    prefault: bool = True

    @property
    def arena_id(self) -> str:
        return f"paged.{self.pool}"


@dataclass(frozen=True, slots=True)
class PagedPoolView:
    """What a client needs to map a paged pool: its layout, blocks and arena."""

    spec: PagedPoolSpec
    arena: CacheInfo
    handle: CacheHandle


@dataclass(frozen=True, slots=True)
class BlockMap:
    spec: PagedPoolSpec
    map: str
    stats: PagedStats
    sequences: list[SequenceView]


class PagedPools:
    """The paged pools of one engine (``specs``); ``create_arenas`` before serving."""

    def __init__(self, engine: Engine, specs: Mapping[str, PagedPoolSpec]) -> None:
        self._engine = engine
        self.specs = dict(specs)
        self._arenas = {name: PagedArena(s.num_blocks, s.layout.block_tokens) for name, s in specs.items()}
        self._freed = {name: asyncio.Event() for name in specs}
        self.prefault_seconds: dict[str, float] = {}
        self._arena_infos: dict[str, CacheInfo] = {}
        self._defragging: dict[str, asyncio.Event] = {}  # pool -> set at the commit
        self._copying: set[asyncio.Task] = set()  # referenced until done (a cancelled caller)
        engine.session_end_hooks.append(self._session_ended)
        engine.paged_figures = self.stats

    async def create_arenas(self) -> None:
        """Allocate (and, with ``prefault``, zero) every paged pool's arena."""
        for pool in self.specs:
            await self.create_arena(pool)

    async def create_arena(self, pool: str) -> None:
        """Allocate (and, with ``prefault``, zero) one paged pool's arena."""
        spec = self.specs[pool]
        nbytes = spec.num_blocks * spec.layout.bytes_per_block
        request = AllocationRequest(
            spec.pool, nbytes, holder=ARENA_HOLDER, cache_id=spec.arena_id, pinned=True, retain=True,
            model_name="paged-kv-arena",
        )  # fmt: skip
        info, handle = await self._engine.allocate(request)
        self._arena_infos[pool] = info
        if spec.prefault:
            started = time.perf_counter()
            memory = self._engine.memory(info.device_id)
            extent = info.extents[0]
            await asyncio.to_thread(memory.zero, extent.segment_id, extent.offset, extent.nbytes)
            self.prefault_seconds[spec.pool] = time.perf_counter() - started
        log.info("paged pool %s: arena %s of %d blocks x %d tokens (%d bytes)%s", spec.pool, spec.arena_id,
                 spec.num_blocks, spec.layout.block_tokens, nbytes,
                 f", prefaulted in {self.prefault_seconds[spec.pool]:.3f} s" if spec.prefault else "")  # fmt: skip

    # -- queries ------------------------------------------------------------------------

    def arena(self, pool: str) -> PagedArena:
        arena = self._arenas.get(pool)
        if arena is None:
            known = ", ".join(sorted(self._arenas)) or "none"
            raise NotFound(f"pool {pool!r} is not a paged pool (paged pools: {known})")
        return arena

    async def open(self, pool: str, holder: str) -> PagedPoolView:
        """The pool's layout and its arena's handle (the caller holds the arena, so its
        session maps the segment as any attach does)."""
        self.arena(pool)
        spec = self.specs[pool]
        info, handle = await self._engine.attach(spec.arena_id, holder)
        return PagedPoolView(spec, info, handle)

    def block_map(self, pool: str) -> BlockMap:
        arena = self.arena(pool)
        return BlockMap(self.specs[pool], arena.block_map(), arena.stats(), arena.sequences())

    def stats(self) -> dict[str, PagedStats]:
        return {name: arena.stats() for name, arena in self._arenas.items()}

    # -- sequences ----------------------------------------------------------------------

    async def allocate(
        self, pool: str, seq_id: str, holder: str, *, prompt_tokens: int, max_tokens: int, tokens_wanted: int,
        priority: int = 0, pinned: bool = False, on_oom: str = "reject", wait_timeout_s: float = 0.0,
    ) -> SequenceView:  # fmt: skip
        """Create a sequence holding at least ``prompt_tokens`` (``reduce``: its whole
        ``max_tokens``, or what fits) plus headroom up to ``tokens_wanted``."""
        arena = self.arena(pool)
        validate_id("sequence_id", seq_id)
        if on_oom not in OOM_STRATEGIES:
            raise InvalidArgument("on_oom", f"must be one of {', '.join(OOM_STRATEGIES)}, got {on_oom!r}")
        if on_oom == "reduce" and not max_tokens:
            raise InvalidArgument("max_tokens", "the reduce strategy needs max_tokens (what to reduce)")
        deadline = time.monotonic() + wait_timeout_s
        while True:
            await self._quiet(pool)  # also after a wait: a defragment may have begun meanwhile
            needed = prompt_tokens
            if on_oom == "reduce":  # all of max_tokens now, or every free block
                needed = max(prompt_tokens, min(max_tokens, arena.free_blocks * arena.block_tokens))
                max_tokens = needed
            self._make_room(pool, arena, arena.blocks_for(needed), priority)
            freed = self._freed[pool]
            try:
                view = arena.allocate(
                    seq_id, holder, tokens_used=prompt_tokens, tokens_needed=needed,
                    tokens_wanted=max(tokens_wanted, needed), max_tokens=max_tokens, priority=priority, pinned=pinned,
                )  # fmt: skip
            except OutOfTokens as err:
                remaining = deadline - time.monotonic()
                if on_oom != "wait" or not err.satisfiable or remaining <= 0:
                    if on_oom == "wait" and err.satisfiable:
                        raise DeadlineExceeded(f"{err} after waiting {wait_timeout_s:.3f} s") from None
                    raise
                log.info("paged pool %s: sequence %s waits up to %.3f s for %d tokens (%d free)",
                         pool, seq_id, remaining, err.tokens_requested, err.tokens_free)  # fmt: skip
                try:
                    await asyncio.wait_for(freed.wait(), remaining)
                except TimeoutError:
                    pass
                continue
            self._settle(pool)
            return view

    async def extend(self, pool: str, seq_id: str, holder: str, *, tokens_used: int, tokens_needed: int,
                     tokens_wanted: int) -> SequenceView:  # fmt: skip
        arena = self.arena(pool)
        await self._quiet(pool)
        seq = self._held(arena, seq_id, holder)
        missing = arena.blocks_for(tokens_needed) - seq.tokens_reserved // arena.block_tokens
        self._make_room(pool, arena, missing, seq.priority)
        view = arena.extend(seq_id, tokens_used=tokens_used, tokens_needed=tokens_needed, tokens_wanted=tokens_wanted)
        self._settle(pool)
        return view

    async def free(self, pool: str, seq_id: str, holder: str) -> bool:
        """Free a sequence this caller holds; False for one that is gone (idempotent)."""
        arena = self.arena(pool)
        await self._quiet(pool)
        if seq_id not in arena:
            return False
        self._held(arena, seq_id, holder)
        arena.free(seq_id)
        self._wake(pool)
        return True

    async def attach(self, pool: str, seq_id: str, holder: str) -> SequenceView:
        self.arena(pool)
        await self._quiet(pool)
        return self.arena(pool).attach(seq_id, holder)

    async def report(self, pool: str, seq_id: str, holder: str, tokens_used: int) -> SequenceView:
        arena = self.arena(pool)
        await self._quiet(pool)
        self._held(arena, seq_id, holder)
        return arena.report(seq_id, tokens_used)

    async def pin(self, pool: str, seq_id: str, holder: str, pinned: bool) -> SequenceView:
        arena = self.arena(pool)
        await self._quiet(pool)
        self._held(arena, seq_id, holder)
        view = arena.pin(seq_id) if pinned else arena.unpin(seq_id)
        if not pinned:
            self._wake(pool)  # a waiter of a higher priority may evict it now
        return view

    async def defragment(self, pool: str, *, dry_run: bool) -> DefragmentResult:
        """Move unpinned sequences' blocks so that each is one run (module docstring).
        The result counts sequences as ``caches_moved``, the copied blocks' bytes over
        every layer as ``bytes_moved``, and lists the block copies (``block_moves``)."""
        arena = self.arena(pool)
        started = time.perf_counter()
        await self._quiet(pool)
        spec, info = self.specs[pool], self._arena_infos[pool]
        plan = plan_defragment(arena)
        extent, per_block = info.extents[0], spec.layout.bytes_per_block
        listed = tuple((c.seq_id, c.source, c.destination) for c in plan.copies[:MAX_LISTED_BLOCK_MOVES])
        moved = plan.sequences_moved
        if plan.copies and not dry_run:
            done = asyncio.Event()
            self._defragging[pool] = done
            moves = block_moves(spec.layout, spec.num_blocks, extent, spec.arena_id, plan.copies)
            task = asyncio.get_running_loop().create_task(self._copy_and_commit(pool, plan, moves, info.device_id, done))
            self._copying.add(task)
            task.add_done_callback(self._copying.discard)
            moved = await asyncio.shield(task)
        free_bytes = plan.blocks_free * per_block
        return DefragmentResult(
            caches_moved=moved, bytes_moved=len(plan.copies) * per_block,
            fragmentation_before=plan.fragmentation_before, fragmentation_after=plan.fragmentation_after,
            segments_freed=0, duration_seconds=time.perf_counter() - started, dry_run=dry_run,
            before=Fragmentation(free_bytes=free_bytes), after=Fragmentation(free_bytes=free_bytes),
            moves_total=len(plan.copies), paged=True, block_moves=listed,
        )  # fmt: skip

    async def _copy_and_commit(self, pool: str, plan, moves, device_id: str, done: asyncio.Event) -> int:
        """Copy in a thread, then commit; runs to its end even when the caller is
        cancelled (a copy cannot stop half-way and the pool waits for the commit). A
        failed copy may have shifted the moved sequences' bytes part-way: they are
        evicted (their holders get EVICTED), pinned ones were never touched."""
        arena = self._arenas[pool]
        try:
            await asyncio.to_thread(self._engine.memory(device_id).copy, moves)
        except Exception:
            log.exception("paged pool %s: defragment copy failed; evicting the %d sequences it was moving",
                          pool, plan.sequences_moved)  # fmt: skip
            for seq_id in plan.runs_before:
                if seq_id in arena and not arena.get(seq_id).pinned:
                    arena.evict(seq_id, "a defragment copy failed")
            raise
        else:
            moved = arena.relocate(plan.runs_before, plan.runs_after, "defragment")
            log.info("paged pool %s: defragmented, %d sequences moved (%d block copies), fragmentation %.3f -> %.3f",
                     pool, len(moved), len(plan.copies), plan.fragmentation_before, plan.fragmentation_after)  # fmt: skip
            return len(moved)
        finally:
            del self._defragging[pool]
            done.set()
            self._settle(pool)
            self._wake(pool)

    async def _quiet(self, pool: str) -> None:
        """Until no defragmentation of ``pool`` is copying (no suspension when none is)."""
        while (done := self._defragging.get(pool)) is not None:
            await done.wait()

    # -- internals ----------------------------------------------------------------------

    def _held(self, arena: PagedArena, seq_id: str, holder: str) -> SequenceView:
        view = arena.get(seq_id)
        if holder not in view.holders:
            raise FailedPrecondition(f"sequence {seq_id!r} is not held by this caller (attach it first)")
        return view

    def _make_room(self, pool: str, arena: PagedArena, blocks: int, priority: int) -> None:
        for victim in arena.victims(blocks, priority):
            view = arena.evict(victim, f"room for a sequence of priority {priority}")
            log.info("paged pool %s: evicted sequence %s (%d tokens reserved, priority %d)",
                     pool, victim, view.tokens_reserved, view.priority)  # fmt: skip

    def _settle(self, pool: str) -> None:
        events = self._arenas[pool].drain_events()
        if events:
            arena_id = self.specs[pool].arena_id
            kinds = {"evicted": EventKind.EVICTED, "moved": EventKind.MOVED}
            self._engine.deliver([
                Event(kinds[e.kind], e.recipients, cache_id=arena_id, epoch=e.epoch, reason=e.reason, sequence_id=e.seq_id)
                for e in events
            ])  # fmt: skip

    def _wake(self, pool: str) -> None:
        """Blocks were freed: every waiting allocation of the pool tries again."""
        self._freed[pool].set()
        self._freed[pool] = asyncio.Event()

    def _session_ended(self, session_id: str) -> None:
        for pool, arena in self._arenas.items():
            if arena.detach(session_id):
                self._wake(pool)
