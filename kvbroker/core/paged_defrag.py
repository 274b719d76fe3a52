"""Defragmenting a paged pool: block moves that put every unpinned sequence in one run.

A sequence in one run gets zero-copy K/V views (a gather otherwise), and free blocks in
one run take the next sequence whole. ``plan_defragment`` computes the target layout and
the block copies that reach it; it moves no bytes (the engine copies each block of every
layer and K/V half, ``kvbroker.engine.paged``) and changes nothing (``PagedArena.relocate``
commits the plan once the bytes are there).

Target layout: pinned sequences stay where they are (a pinned sequence's blocks never
move). The other sequences, in the order of their first block, each take the lowest
run of blocks that holds it whole, among blocks no pinned or already placed sequence
takes: so without pinned sequences every sequence is one run, packed from block 0, and
the free blocks are one run at the end. A sequence that finds no such run (pinned ones
in the way) stays where it is; so does one already in its place (no copy).

Copy order: every block is the source of at most one copy and the destination of at most
one, so the copies form chains and cycles. A chain is copied from its end (the copy into
a block that is no source) backwards, so no block is overwritten before it was read. A
cycle goes through a *scratch* block free now: its last block is saved to scratch, the
rest shift, scratch goes to the first. Cycles are copied before chains, so the scratch
block (which a chain may write) is free while they run. With no free block (a full
arena) the sequences of a cycle stay where they are.

Cost: O(blocks x sequences) in the worst case, plus one restart per sequence that must
stay; a few milliseconds for thousands of blocks. Pure standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbroker.core.paged import PagedArena


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Copy block ``source`` to block ``destination`` (every layer, K and V), for
    sequence ``seq_id``. Applied in plan order."""

    seq_id: str
    source: int
    destination: int


@dataclass(frozen=True, slots=True)
class PagedDefragPlan:
    """``copies`` in the order they must run; ``runs_before``/``runs_after``: the moved
    sequences' runs now and after (only sequences whose blocks change); fragmentation as
    ``PagedStats.fragmentation`` before and after."""

    copies: tuple[BlockCopy, ...]
    runs_before: dict[str, tuple[tuple[int, int], ...]]
    runs_after: dict[str, tuple[tuple[int, int], ...]]
    fragmentation_before: float
    fragmentation_after: float
    blocks_free: int

    @property
    def sequences_moved(self) -> int:
        return len(self.runs_after)


def plan_defragment(arena: PagedArena) -> PagedDefragPlan:
    """The plan that makes ``arena``'s unpinned sequences one run each (module docstring)."""
    views = arena.sequences()
    current = {v.seq_id: v.runs for v in views}
    staying = {v.seq_id for v in views if v.pinned or not v.runs}
    free_now = [b for start, count in arena.free_runs() for b in range(start, start + count)]
    while True:
        target = _target_layout(arena.num_blocks, views, current, staying)
        if isinstance(target, str):  # that sequence finds no run: it stays
            staying.add(target)
            continue
        moved = {s: runs for s, runs in target.items() if runs != current[s]}
        copies = _ordered_copies(moved, current, free_now[0] if free_now else None)
        if isinstance(copies, set):  # cycles and no scratch block: their sequences stay
            staying |= copies
            continue
        break
    after_used = [False] * arena.num_blocks
    for seq_id, runs in current.items():
        for start, count in moved.get(seq_id, runs):
            after_used[start:start + count] = [True] * count
    return PagedDefragPlan(
        tuple(copies), {s: current[s] for s in moved}, moved, arena.stats().fragmentation,
        _fragmentation(after_used), arena.free_blocks,
    )  # fmt: skip


def _target_layout(num_blocks: int, views, current, staying: set[str]) -> dict[str, tuple] | str:
    taken = [False] * num_blocks
    for seq_id in staying:
        for start, count in current[seq_id]:
            taken[start:start + count] = [True] * count
    target: dict[str, tuple[tuple[int, int], ...]] = {}
    for view in views:  # ordered by first block
        if view.seq_id in staying:
            continue
        need = sum(count for _, count in view.runs)
        start = _lowest_run(taken, need)
        if start is None:
            return view.seq_id
        taken[start:start + need] = [True] * need
        target[view.seq_id] = ((start, need),)
    return target


def _lowest_run(taken: list[bool], need: int) -> int | None:
    length = 0
    for block, used in enumerate(taken):
        length = 0 if used else length + 1
        if length == need:
            return block - need + 1
    return None


def _ordered_copies(moved, current, scratch: int | None) -> list[BlockCopy] | set[str]:
    """The block copies in a safe order, or the sequences of the cycles when there is
    no scratch block for them."""
    dst_of: dict[int, int] = {}
    owner: dict[int, str] = {}
    for seq_id, runs in moved.items():
        old = [b for s, c in current[seq_id] for b in range(s, s + c)]
        new = [b for s, c in runs for b in range(s, s + c)]
        for src, dst in zip(old, new, strict=True):
            if src != dst:
                dst_of[src] = dst
                owner[src] = seq_id
    src_of = {dst: src for src, dst in dst_of.items()}
    done: set[int] = set()
    chains: list[BlockCopy] = []
    for src, dst in dst_of.items():
        if dst in dst_of:  # not a chain's end
            continue
        while src is not None and src not in done:  # walk back from the end
            done.add(src)
            chains.append(BlockCopy(owner[src], src, dst_of[src]))
            src = src_of.get(src)
    cycles: list[BlockCopy] = []
    stuck: set[str] = set()
    for first in dst_of:
        if first in done:
            continue
        cycle = [first]
        while dst_of[cycle[-1]] != first:
            cycle.append(dst_of[cycle[-1]])
        done.update(cycle)
        if scratch is None:
            stuck.update(owner[b] for b in cycle)
            continue
        last = cycle[-1]  # last -> first closes the cycle
        cycles.append(BlockCopy(owner[last], last, scratch))
        for src in reversed(cycle[:-1]):
            cycles.append(BlockCopy(owner[src], src, dst_of[src]))
        cycles.append(BlockCopy(owner[last], scratch, first))
    return stuck if stuck else cycles + chains


def _fragmentation(used: list[bool]) -> float:
    free = used.count(False)
    largest = length = 0
    for u in used:
        length = 0 if u else length + 1
        largest = max(largest, length)
    return 0.0 if not free else 1.0 - largest / free
