"""Directed cases of ``plan_defragment`` (the state machine covers random ones): a split
sequence joined through a cycle with a scratch block, a full arena where the cycle cannot
be broken, a pinned sequence in the way; and a property over any layout (blocks of
sequences in any order, so copies form long chains and cycles)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbroker.core.paged import PagedArena, Sequence
from kvbroker.core.paged_defrag import plan_defragment


def _run_plan(arena: PagedArena):
    tables = {v.seq_id: [b for s, c in v.runs for b in range(s, s + c)] for v in arena.sequences()}
    content = {b: (s, i) for s, table in tables.items() for i, b in enumerate(table)}
    plan = plan_defragment(arena)
    for copy in plan.copies:
        content[copy.destination] = content.get(copy.source)
    arena.relocate(plan.runs_before, plan.runs_after, "test")
    arena.check()
    for view in arena.sequences():
        table = [b for s, c in view.runs for b in range(s, s + c)]
        assert [content[b] for b in table] == [(view.seq_id, i) for i in range(len(table))]
    return plan


def _split_arena(num_blocks: int) -> PagedArena:
    """``a`` holds blocks 0 and 5, ``b`` blocks 1-4: joining ``a`` is a cycle of copies."""
    arena = PagedArena(num_blocks, 4)
    arena.allocate("a", "s", tokens_used=0, tokens_needed=4)
    arena.allocate("b", "s", tokens_used=0, tokens_needed=16)
    arena.allocate("c", "s", tokens_used=0, tokens_needed=4)
    arena.free("c")
    arena.extend("a", tokens_used=4, tokens_needed=8)
    assert arena.get("a").runs == ((0, 1), (5, 1)) and arena.get("b").runs == ((1, 4),)
    return arena


def test_a_cycle_goes_through_a_scratch_block():
    arena = _split_arena(7)
    plan = _run_plan(arena)
    assert arena.get("a").runs == ((0, 2),) and arena.get("b").runs == ((2, 4),)
    assert any(c.destination == 6 for c in plan.copies)  # the scratch block
    assert [e.seq_id for e in arena.drain_events()] == ["a", "b"]
    assert arena.stats().fragmentation == 0.0 and arena.free_runs() == [(6, 1)]


def test_a_full_arena_leaves_a_cycle_alone():
    arena = _split_arena(6)
    plan = _run_plan(arena)
    assert plan.copies == () and arena.get("a").runs == ((0, 1), (5, 1))


def test_a_pinned_sequence_never_moves_and_others_go_around_it():
    arena = PagedArena(10, 4)
    for seq, tokens in (("x", 8), ("p", 8), ("y", 8), ("z", 8)):
        arena.allocate(seq, "s", tokens_used=0, tokens_needed=tokens)
    arena.pin("p")
    arena.free("x")
    plan = _run_plan(arena)
    assert arena.get("p").runs == ((2, 2),)
    assert arena.get("y").runs == ((0, 2),) and arena.get("z").runs == ((4, 2),)
    assert plan.fragmentation_before > 0 and plan.sequences_moved == 2


@st.composite
def layouts(draw):
    """Any layout: each block free or owned by one of up to six sequences, each
    sequence's blocks in any order (so copies form long chains and cycles), some pinned."""
    num_blocks = draw(st.integers(1, 40))
    owners = draw(st.lists(st.sampled_from(["", "a", "b", "c", "d", "e", "f"]), min_size=num_blocks, max_size=num_blocks))
    tables = {}
    for seq in sorted(set(owners) - {""}):
        blocks = [b for b, o in enumerate(owners) if o == seq]
        tables[seq] = draw(st.permutations(blocks))
    pinned = draw(st.sets(st.sampled_from(sorted(tables)))) if tables else set()
    return num_blocks, tables, pinned


def _arena_of(num_blocks: int, tables: dict[str, list[int]], pinned: set[str]) -> PagedArena:
    arena = PagedArena(num_blocks, 2)
    arena._sequences = {
        seq: Sequence(seq, _runs(table), 2 * len(table), 0, 0, {"h"}, seq in pinned) for seq, table in tables.items()
    }  # (built directly: no sequence of calls makes an arbitrary layout)
    held = {b for table in tables.values() for b in table}
    arena._starts, arena._free = [], {}
    arena._give_back([(b, 1) for b in range(num_blocks) if b not in held])
    arena.check()
    return arena


def _runs(table: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for b in table:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


@settings(max_examples=400, deadline=None)
@given(layouts())
def test_any_layout_every_sequence_keeps_its_data_in_order_and_pinned_ones_stay(layout):
    num_blocks, tables, pinned = layout
    arena = _arena_of(num_blocks, tables, pinned)
    free_before = arena.free_blocks
    plan = _run_plan(arena)  # data in order, invariants (partition, no block twice)
    assert not set(plan.runs_after) & pinned
    for seq in pinned:
        assert list(arena.get(seq).runs) == _runs(tables[seq])
    assert arena.free_blocks == free_before and len(arena) == len(tables)
    if not pinned and free_before:  # nothing in the way and a scratch block: a full pack
        assert all(len(arena.get(seq).runs) == 1 for seq in tables)
        assert arena.free_runs() == [(num_blocks - free_before, free_before)]
        assert plan.fragmentation_after == 0.0
