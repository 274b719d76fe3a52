"""Directed cases of ``plan_defragment`` (the state machine covers random ones): a split
sequence joined through a cycle with a scratch block, a full arena where the cycle cannot
be broken, a pinned sequence in the way."""

from __future__ import annotations

from kvbroker.core.paged import PagedArena
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
