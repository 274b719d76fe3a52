"""A paged pool's block allocator driven as a state machine against a model.

Random allocate / append (extending through the allocator when a sequence's blocks are
full, as the client does) / free / evict / pin / unpin / attach / session end over a
small arena. After every step: ``PagedArena.check`` (free runs and sequences partition
the arena, no block in two sequences, free runs coalesced), exact accounting (free +
held blocks = arena; per sequence, reserved slots = blocks x block_tokens), a pinned
sequence's blocks never change (an extension only appends to its block table), every
appended token's slot lies inside its sequence's blocks, and every slot written is owned
by exactly that sequence (no two live tokens share a slot). Refusals are checked too:
``OutOfTokens`` only when the free blocks really are too few, carrying those figures.
A defragment rule plans (``plan_defragment``), runs the block copies over a model of the
blocks' contents and commits (``PagedArena.relocate``): every moved sequence's data ends
in its new blocks in order, pinned sequences never move, only moved sequences get a
``moved`` event, and without pinned sequences every sequence ends in one run with the
free blocks in one run.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbroker.core.errors import FailedPrecondition, InvalidArgument
from kvbroker.core.paged import OutOfTokens, PagedArena
from kvbroker.core.paged_defrag import plan_defragment

BLOCK_TOKENS = 4
NUM_BLOCKS = 24
SESSIONS = ("s1", "s2", "s3")
IDS = st.sampled_from([f"q{i}" for i in range(8)])


class PagedMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.arena = PagedArena(NUM_BLOCKS, BLOCK_TOKENS, clock=self._clock)
        self.used: dict[str, int] = {}  # tokens written per sequence (the client's count)
        self.slots: dict[str, list[int]] = {}  # the slot of every token written
        self.pinned_table: dict[str, list[int]] = {}

    def _clock(self) -> float:
        self.now += 1.0
        return self.now

    @rule(seq=IDS, holder=st.sampled_from(SESSIONS), prompt=st.integers(0, 40), head=st.integers(0, 40),
          max_tokens=st.sampled_from([0, 8, 30, 100]), priority=st.integers(0, 2), pinned=st.booleans())
    def allocate(self, seq, holder, prompt, head, max_tokens, priority, pinned):
        free_before = self.arena.free_blocks
        try:
            view = self.arena.allocate(seq, holder, tokens_used=0, tokens_needed=prompt, tokens_wanted=prompt + head,
                                       max_tokens=max_tokens, priority=priority, pinned=pinned)
        except OutOfTokens as err:
            assert -(-prompt // BLOCK_TOKENS) > free_before
            assert err.tokens_free == free_before * BLOCK_TOKENS
            assert err.tokens_requested == -(-prompt // BLOCK_TOKENS) * BLOCK_TOKENS
            assert self.arena.free_blocks == free_before and seq not in self.arena
            return
        except InvalidArgument:
            assert max_tokens and prompt > max_tokens
            return
        except Exception as err:  # AlreadyExists
            assert seq in self.used, err
            return
        assert view.tokens_reserved >= prompt
        assert not max_tokens or view.tokens_reserved <= -(-max_tokens // BLOCK_TOKENS) * BLOCK_TOKENS
        self.used[seq], self.slots[seq] = 0, []
        if pinned:
            self.pinned_table[seq] = self.arena_table(seq)
        self.append(seq, prompt)

    def arena_table(self, seq: str) -> list[int]:
        return [b for start, count in self.arena.get(seq).runs for b in range(start, start + count)]

    def append(self, seq: str, n: int) -> None:
        """The client's append: slots inside granted blocks; extend when they run out."""
        for _ in range(n):
            table = self.arena_table(seq)
            t = self.used[seq]
            if t >= len(table) * BLOCK_TOKENS:
                try:
                    self.arena.extend(seq, tokens_used=t, tokens_needed=t + 1, tokens_wanted=t + 8)
                except (OutOfTokens, InvalidArgument):
                    return
                new = self.arena_table(seq)
                assert new[: len(table)] == table, "an extension changed existing blocks"
                table = new
            block = table[t // BLOCK_TOKENS]
            slot = block * BLOCK_TOKENS + t % BLOCK_TOKENS
            self.slots[seq].append(slot)
            self.used[seq] = t + 1

    @precondition(lambda self: self.used)
    @rule(data=st.data(), n=st.integers(1, 20))
    def append_tokens(self, data, n):
        self.append(data.draw(st.sampled_from(sorted(self.used))), n)

    @precondition(lambda self: self.used)
    @rule(data=st.data(), more=st.integers(0, 64))
    def grant_ahead(self, data, more):
        """The client's grant ahead: nothing needed beyond what it holds, headroom
        wanted; existing blocks stay, and only what the pool could spare is taken."""
        seq = data.draw(st.sampled_from(sorted(self.used)))
        table = self.arena_table(seq)
        held = len(table) * BLOCK_TOKENS
        free = self.arena.stats().blocks_free
        max_tokens = self.arena.get(seq).max_tokens
        if max_tokens and self.used[seq] >= max_tokens:
            return  # nothing to look ahead for (the client asks for no more)
        needed = max(self.used[seq], min(held, max_tokens) if max_tokens else held)
        wanted = min(held + more, max_tokens) if max_tokens else held + more
        more = max(0, wanted - held)
        self.arena.extend(seq, tokens_used=self.used[seq], tokens_needed=needed, tokens_wanted=wanted)
        new = self.arena_table(seq)
        assert new[: len(table)] == table, "a grant ahead changed existing blocks"
        taken, extra = len(new) - len(table), -(-more // BLOCK_TOKENS)
        num = self.arena.num_blocks  # headroom: at most extra x free / num, rounded to nearest
        assert taken <= extra and 2 * taken * num <= 2 * extra * free + num, "more than the pool could spare"

    @rule(seq=IDS)
    def free(self, seq):
        assert self.arena.free(seq) == (seq in self.used)
        assert not self.arena.free(seq)  # the second free is a no-op
        self._forget(seq)

    def _forget(self, seq: str) -> None:
        self.used.pop(seq, None)
        self.slots.pop(seq, None)
        self.pinned_table.pop(seq, None)

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def evict(self, data):
        seq = data.draw(st.sampled_from(sorted(self.used)))
        try:
            self.arena.evict(seq, "test")
        except FailedPrecondition:
            assert seq in self.pinned_table
            return
        assert seq not in self.pinned_table
        events = self.arena.drain_events()
        assert [(e.kind, e.seq_id) for e in events] == [("evicted", seq)]
        self._forget(seq)

    @rule(blocks=st.integers(0, NUM_BLOCKS + 2), priority=st.integers(0, 3))
    def evict_for_room(self, blocks, priority):
        victims = self.arena.victims(blocks, priority)
        for seq in victims:
            assert seq not in self.pinned_table
            assert self.arena.get(seq).priority < priority
            self.arena.evict(seq, "room")
            self._forget(seq)
        if victims:
            assert self.arena.free_blocks >= blocks
        self.arena.drain_events()

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def pin(self, data):
        seq = data.draw(st.sampled_from(sorted(self.used)))
        self.arena.pin(seq)
        self.pinned_table[seq] = self.arena_table(seq)

    @precondition(lambda self: self.pinned_table)
    @rule(data=st.data())
    def unpin(self, data):
        seq = data.draw(st.sampled_from(sorted(self.pinned_table)))
        self.arena.unpin(seq)
        del self.pinned_table[seq]

    @precondition(lambda self: self.used)
    @rule(data=st.data(), holder=st.sampled_from(SESSIONS))
    def attach(self, data, holder):
        self.arena.attach(data.draw(st.sampled_from(sorted(self.used))), holder)

    @rule(holder=st.sampled_from(SESSIONS))
    def session_ends(self, holder):
        held = {s for s in self.used if holder in self.arena.get(s).holders}
        freed = self.arena.detach(holder)
        for seq in held:
            if seq in freed:
                self._forget(seq)
            else:
                assert self.arena.get(seq).holders
        assert set(freed) <= held

    @rule()
    def defragment(self):
        tables = {s: self.arena_table(s) for s in self.used}
        content = {b: (s, i) for s, table in tables.items() for i, b in enumerate(table)}
        plan = plan_defragment(self.arena)
        assert not set(plan.runs_after) & set(self.pinned_table), "a pinned sequence is planned to move"
        for copy in plan.copies:  # a copy reads what earlier copies left
            content[copy.destination] = content.get(copy.source)
        moved = self.arena.relocate(plan.runs_before, plan.runs_after, "defragment")
        assert sorted(moved) == sorted(plan.runs_after)
        assert sorted(e.seq_id for e in self.arena.drain_events() if e.kind == "moved") == sorted(moved)
        for seq in self.used:
            new = self.arena_table(seq)
            assert len(new) == len(tables[seq])
            for i, b in enumerate(new):
                assert content[b] == (seq, i), f"block {i} of {seq} lost its data"
            bt = BLOCK_TOKENS
            self.slots[seq] = [new[tables[seq].index(slot // bt)] * bt + slot % bt for slot in self.slots[seq]]
        if not self.pinned_table and self.arena.free_blocks:
            assert all(len(self.arena.get(s).runs) <= 1 for s in self.used), "a sequence left in several runs"
            assert len(self.arena.free_runs()) == 1 and self.arena.stats().fragmentation == 0.0

    @invariant()
    def consistent(self):
        self.arena.check()
        stats = self.arena.stats()
        held = sum(len(self.arena_table(s)) for s in self.used)
        assert stats.blocks_free + held == NUM_BLOCKS == stats.blocks_free + stats.blocks_used
        assert stats.sequences == len(self.used)
        assert stats.tokens_reserved == held * BLOCK_TOKENS
        assert self.arena.block_map().count("X") == held
        owner = {}
        for seq in self.used:
            table = self.arena_table(seq)
            assert len(self.slots[seq]) == self.used[seq]
            for slot in self.slots[seq]:
                assert slot // BLOCK_TOKENS in table, "a token's slot is outside its sequence's blocks"
                assert slot not in owner, "two live tokens share a slot"
                owner[slot] = seq
        for seq, table in self.pinned_table.items():
            assert self.arena_table(seq)[: len(table)] == table, "a pinned sequence's blocks changed"


PagedMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestPagedMachine = PagedMachine.TestCase


def test_best_fit_and_in_place_extension():
    arena = PagedArena(16, 4)
    arena.allocate("a", "s", tokens_used=0, tokens_needed=8)  # blocks 0-1
    arena.allocate("b", "s", tokens_used=0, tokens_needed=4)  # block 2
    arena.allocate("c", "s", tokens_used=0, tokens_needed=12)  # blocks 3-5
    arena.free("b")  # hole of 1 at 2; free run 6..15
    arena.allocate("d", "s", tokens_used=0, tokens_needed=4)  # best fit: the hole
    assert arena.get("d").runs == ((2, 1),)
    arena.extend("c", tokens_used=12, tokens_needed=16)  # in place after 3-5
    assert arena.get("c").runs == ((3, 4),)
    assert arena.block_map() == "X" * 7 + "." * 9
    stats = arena.stats()
    assert (stats.blocks_used, stats.blocks_free, stats.fragmentation) == (7, 9, 0.0)


def test_headroom_grows_with_what_a_sequence_generated_and_shrinks_as_the_pool_fills():
    arena = PagedArena(1000, 16)
    first = arena.allocate("a", "s", tokens_used=100, tokens_needed=100, tokens_wanted=100 + 16 * 100)
    assert first.tokens_reserved == 16 * (7 + 1)  # nothing generated: one block, x 993/1000 rounds to 1
    grown = arena.extend("a", tokens_used=128, tokens_needed=129, tokens_wanted=129 + 16 * 100)
    assert grown.tokens_reserved == 16 * (9 + 1)  # 28 generated: 1 block x 991/1000 -> 1
    grown = arena.extend("a", tokens_used=612, tokens_needed=613, tokens_wanted=613 + 16 * 100)
    assert grown.tokens_reserved == 16 * (39 + 31)  # 512 generated = 32 blocks, x 961/1000 = 30.8 -> 31
    arena.allocate("fill", "s", tokens_used=0, tokens_needed=16 * 830)  # 100 blocks free
    late = arena.extend("a", tokens_used=1120, tokens_needed=1121, tokens_wanted=1121 + 16 * 100)
    assert late.tokens_reserved == 16 * 71 + 16 * 6  # 63 generated blocks x 99/1000 = 6.2 -> 6
    arena.allocate("more", "s", tokens_used=0, tokens_needed=16 * 88)  # 5 blocks free
    tight = arena.extend("a", tokens_used=1232, tokens_needed=1233, tokens_wanted=1233 + 16 * 100)
    assert tight.tokens_reserved == 16 * 78  # the need alone: 70 blocks x 4/1000 = 0.3 -> 0


def test_a_grant_ahead_takes_what_the_pool_can_spare_and_nothing_when_it_is_nearly_full():
    arena = PagedArena(1000, 16)
    arena.allocate("a", "s", tokens_used=0, tokens_needed=16)
    arena.extend("a", tokens_used=512, tokens_needed=513, tokens_wanted=513)  # 512 generated: 33 blocks
    ahead = arena.extend("a", tokens_used=520, tokens_needed=528, tokens_wanted=528 + 16 * 100)
    assert ahead.tokens_reserved == 16 * (33 + 31)  # needs nothing; 32 generated blocks x 967/1000 = 30.9 -> 31
    assert ahead.tokens_used == 520
    arena.allocate("fill", "s", tokens_used=0, tokens_needed=16 * (1000 - 64 - 5))  # 5 blocks free
    late = arena.extend("a", tokens_used=600, tokens_needed=600, tokens_wanted=600 + 16 * 100)
    assert late.tokens_reserved == 16 * 64  # 37 x 5/1000 = 0.2 -> 0: a nearly full pool grants nothing ahead


def test_out_of_tokens_carries_figures():
    arena = PagedArena(4, 16)
    arena.allocate("a", "s", tokens_used=0, tokens_needed=40)
    try:
        arena.allocate("b", "s", tokens_used=0, tokens_needed=20)
    except OutOfTokens as err:
        assert (err.tokens_requested, err.tokens_free, err.satisfiable) == (32, 16, True)
        assert "32 tokens requested, 16 tokens free" in str(err)
    else:
        raise AssertionError("no refusal")
