"""A paged KV pool's block allocator: which blocks of one arena belong to which sequence.

A paged pool's memory is one arena of ``num_blocks`` blocks of ``block_tokens`` tokens
(``kvbroker.kvlayout``); this module only deals in block numbers, never bytes, as a
paged-attention scheduler does (vLLM's ``vllm/v1/core``). A *sequence* (the seed's
request id) owns a list of *runs* (``(first_block, count)``, in token order): token ``t``
of a sequence lives in block ``block_table[t // block_tokens]`` at offset
``t % block_tokens``, slot ``block * block_tokens + offset``.

Placement keeps sequences in as few runs as it can, because a sequence in one run gets
zero-copy K/V views (a gather otherwise): a new sequence takes the *best-fitting* free
run (the smallest that holds it whole), else the largest runs first; an extension first
grows the sequence's last run *in place* when the blocks right after it are free.

Headroom (``headroom``): a sequence asks for the blocks it needs now plus a batch (the
client's, so that appends inside granted blocks cost no RPC) and gets at most as many
blocks as it has generated since its allocation (at least one): a sequence's grants
double as it goes on generating, as a growing array's do, so a long generation costs
O(log) grants up to the batch, while a new or short one holds little it will not use;
and that, scaled by the free fraction of the pool after the need, so a nearly full
pool grants nothing beyond the need. At the first refusal little of the arena is granted
but unwritten (simulated on six seeded traces of ``benchmarks/paged.py``: 1.8 to 2.2 %,
almost all of it the sequences' partly filled last blocks; 8.5 to 13.7 % with a cap of
free blocks / (4 x sequences), the first rule tried; 2.4 to 3.5 % with the free fraction
to the 4th power, which cost 12 RPCs per 1,000 tokens in a half-full pool against 7).

Invariants (``check``; ``tests/core/test_paged_state_machine.py`` runs them after every
step): free runs and sequences' runs partition ``range(num_blocks)`` exactly (no block
twice, none lost); free runs are sorted, disjoint and never adjacent (coalesced); a
pinned sequence's runs never change until it is unpinned; a sequence never holds more
blocks than ``max_tokens`` needs.

Cost: every operation is O(free runs + the sequence's runs), a few microseconds for
arenas of thousands of blocks; ``victims`` is O(sequences log sequences). Pure standard
library; not thread-safe (one owner: the engine's event loop).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvbroker.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


#: Block map characters (the seed's ``dumpBlockMap``).
USED, FREE = "X", "."


class OutOfTokens(ResourceExhausted):
    """The pool has not the free blocks a sequence needs (RESOURCE_EXHAUSTED).

    Attributes:
        tokens_requested: tokens the call needed reserved (whole blocks).
        tokens_free: tokens the pool's free blocks hold now.
    """

    def __init__(self, message: str, *, tokens_requested: int, tokens_free: int, block_bytes: int = 0,
                 satisfiable: bool = True) -> None:  # fmt: skip
        super().__init__(
            message, requested_bytes=tokens_requested * block_bytes, free_bytes=tokens_free * block_bytes,
            largest_free_extent_bytes=0, satisfiable=satisfiable,
        )
        self.tokens_requested = tokens_requested
        self.tokens_free = tokens_free


@dataclass(slots=True)
class Sequence:
    """One sequence's blocks and figures. ``tokens_used``: as last reported by a client
    (an append inside granted blocks is not reported). ``max_tokens``: 0 for no limit."""

    seq_id: str
    runs: list[tuple[int, int]]
    tokens_used: int
    max_tokens: int
    priority: int
    holders: set[str] = field(default_factory=set)
    pinned: bool = False
    first_tokens: int = 0  # tokens_used at allocation: what it generated since is the rest
    last_use: float = 0.0
    epoch: int = 0

    @property
    def blocks(self) -> int:
        return sum(count for _, count in self.runs)

    def block_table(self) -> list[int]:
        """Every block of the sequence, in token order."""
        return [b for start, count in self.runs for b in range(start, start + count)]


@dataclass(frozen=True, slots=True)
class SequenceView:
    """A sequence as callers see it (a copy: later changes do not show)."""

    seq_id: str
    runs: tuple[tuple[int, int], ...]
    tokens_used: int
    tokens_reserved: int
    max_tokens: int
    priority: int
    pinned: bool
    holders: tuple[str, ...]
    epoch: int


@dataclass(frozen=True, slots=True)
class SequenceEvent:
    """A sequence the pool evicted (``kind="evicted"``) or moved (``"moved"``), for its
    holders."""

    kind: str
    seq_id: str
    recipients: frozenset[str]
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class PagedStats:
    """``fragmentation``: 1 - largest free run / free blocks (0 when all free blocks are
    one run, or none are free), as the seed's ``getFragmentation``.
    ``tokens_used`` sums what clients last reported; ``tokens_reserved`` the granted
    blocks' slots."""

    num_blocks: int
    block_tokens: int
    sequences: int
    blocks_used: int
    blocks_free: int
    free_runs: int
    largest_free_run: int
    fragmentation: float
    tokens_used: int
    tokens_reserved: int
    pinned_sequences: int


class PagedArena:
    """The blocks of one paged pool and the sequences that hold them.

    Args:
        num_blocks: blocks in the arena (at least 1).
        block_tokens: tokens per block.
        clock: the time source of ``last_use`` (eviction order).
    """

    def __init__(self, num_blocks: int, block_tokens: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if num_blocks < 1 or block_tokens < 1:
            raise InvalidArgument("num_blocks", f"an arena needs at least one block of one token, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self._clock = clock
        self._starts: list[int] = [0]  # sorted starts of free runs
        self._free: dict[int, int] = {0: num_blocks}  # start -> count
        self._free_blocks = num_blocks
        self._sequences: dict[str, Sequence] = {}
        self._events: list[SequenceEvent] = []

    # -- queries ------------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    @property
    def free_blocks(self) -> int:
        return self._free_blocks

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._sequences

    def __len__(self) -> int:
        return len(self._sequences)

    def get(self, seq_id: str) -> SequenceView:
        return self._view(self._sequence(seq_id))

    def sequences(self) -> list[SequenceView]:
        """Every sequence, ordered by first block."""
        seqs = sorted(self._sequences.values(), key=lambda s: s.runs[0][0] if s.runs else -1)
        return [self._view(s) for s in seqs]

    def free_runs(self) -> list[tuple[int, int]]:
        return [(s, self._free[s]) for s in self._starts]

    def block_map(self) -> str:
        """One character per block: ``X`` used, ``.`` free (the seed's block map)."""
        chars = [USED] * self.num_blocks
        for start, count in self._free.items():
            chars[start:start + count] = FREE * count
        return "".join(chars)

    def stats(self) -> PagedStats:
        largest = max(self._free.values(), default=0)
        frag = 0.0 if not self._free_blocks else 1.0 - largest / self._free_blocks
        seqs = self._sequences.values()
        return PagedStats(
            self.num_blocks, self.block_tokens, len(self._sequences), self.num_blocks - self._free_blocks,
            self._free_blocks, len(self._free), largest, frag, sum(s.tokens_used for s in seqs),
            sum(s.blocks for s in seqs) * self.block_tokens, sum(1 for s in seqs if s.pinned),
        )  # fmt: skip

    def drain_events(self) -> list[SequenceEvent]:
        events, self._events = self._events, []
        return events

    # -- mutations ----------------------------------------------------------------------

    def allocate(
        self, seq_id: str, holder: str, *, tokens_used: int, tokens_needed: int, tokens_wanted: int | None = None,
        max_tokens: int = 0, priority: int = 0, pinned: bool = False,
    ) -> SequenceView:  # fmt: skip
        """Create ``seq_id`` with blocks for ``tokens_needed`` tokens (at least), plus
        headroom up to ``tokens_wanted`` while free blocks allow (``headroom``).

        Raises ``AlreadyExists``, ``InvalidArgument`` (counts out of order, or beyond
        ``max_tokens``), ``OutOfTokens`` (fewer free blocks than needed: nothing held).
        """
        if seq_id in self._sequences:
            raise AlreadyExists(f"sequence {seq_id!r} already exists in this pool")
        wanted = self._check_counts(tokens_used, tokens_needed, tokens_wanted, max_tokens)
        need = self.blocks_for(tokens_needed)
        if need > self.num_blocks:
            self._refuse(tokens_needed, satisfiable=False)
        if need > self._free_blocks:
            self._refuse(tokens_needed)
        grant = need + self.headroom(self.blocks_for(wanted) - need, need, 0)
        seq = Sequence(seq_id, [], tokens_used, max_tokens, priority, {holder}, pinned, tokens_used, self._clock())
        self._take(seq, grant)
        self._sequences[seq_id] = seq
        return self._view(seq)

    def extend(self, seq_id: str, *, tokens_used: int, tokens_needed: int, tokens_wanted: int | None = None) -> SequenceView:
        """Grow ``seq_id`` so that it holds ``tokens_needed`` tokens at least, plus
        headroom up to ``tokens_wanted``; records ``tokens_used``. A sequence that already
        holds ``tokens_needed`` gets headroom alone (a *grant ahead*: a client asks before
        its blocks run out, so that no append waits on the answer), which is what the
        pool can spare (``headroom``): nothing in a nearly full pool. Extending a pinned
        sequence is allowed: its existing blocks stay where they are. Raises
        ``NotFound``, ``InvalidArgument``, ``OutOfTokens``."""
        seq = self._sequence(seq_id)
        wanted = self._check_counts(tokens_used, tokens_needed, tokens_wanted, seq.max_tokens)
        seq.tokens_used = tokens_used
        seq.last_use = self._clock()
        need = max(0, self.blocks_for(tokens_needed) - seq.blocks)
        if need == 0:
            ahead = self.headroom(self.blocks_for(wanted) - seq.blocks, 0, tokens_used - seq.first_tokens)
            if ahead:
                self._take(seq, ahead)
            return self._view(seq)
        if need > self._free_blocks:
            satisfiable = self.blocks_for(tokens_needed) <= self.num_blocks
            self._refuse(tokens_needed - seq.blocks * self.block_tokens, satisfiable=satisfiable)
        extra = self.blocks_for(wanted) - seq.blocks - need
        self._take(seq, need + self.headroom(extra, need, tokens_used - seq.first_tokens))
        return self._view(seq)

    def report(self, seq_id: str, tokens_used: int) -> SequenceView:
        """Record the tokens a client says it wrote (within the sequence's blocks)."""
        seq = self._sequence(seq_id)
        if tokens_used < 0 or tokens_used > seq.blocks * self.block_tokens:
            raise InvalidArgument("tokens_used", f"must be 0 to {seq.blocks * self.block_tokens}, got {tokens_used}")
        seq.tokens_used, seq.last_use = tokens_used, self._clock()
        return self._view(seq)

    def attach(self, seq_id: str, holder: str) -> SequenceView:
        seq = self._sequence(seq_id)
        seq.holders.add(holder)
        seq.last_use = self._clock()
        return self._view(seq)

    def free(self, seq_id: str) -> bool:
        """Give a sequence's blocks back; False (a no-op) for an unknown sequence, so a
        second free is harmless (the seed's ``freeFor``)."""
        seq = self._sequences.pop(seq_id, None)
        if seq is None:
            return False
        self._give_back(seq.runs)
        return True

    def detach(self, holder: str) -> list[str]:
        """``holder`` (a session) is gone: it leaves every sequence it held; a sequence
        nobody holds any more is freed. Returns the freed ids."""
        freed = []
        for seq in list(self._sequences.values()):
            if holder in seq.holders:
                seq.holders.discard(holder)
                if not seq.holders:
                    self.free(seq.seq_id)
                    freed.append(seq.seq_id)
        return freed

    def pin(self, seq_id: str) -> SequenceView:
        seq = self._sequence(seq_id)
        seq.pinned = True
        return self._view(seq)

    def unpin(self, seq_id: str) -> SequenceView:
        seq = self._sequence(seq_id)
        if not seq.pinned:
            raise FailedPrecondition(f"sequence {seq_id!r} is not pinned")
        seq.pinned = False
        return self._view(seq)

    def evict(self, seq_id: str, reason: str) -> SequenceView:
        """Free an unpinned sequence on the broker's behalf; its holders get an
        ``evicted`` event. Raises ``FailedPrecondition`` for a pinned one."""
        seq = self._sequence(seq_id)
        if seq.pinned:
            raise FailedPrecondition(f"sequence {seq_id!r} is pinned: it is never evicted")
        view = self._view(seq)
        self.free(seq_id)
        self._events.append(SequenceEvent("evicted", seq_id, frozenset(seq.holders), seq.epoch + 1, reason))
        return view

    def relocate(self, runs_before: dict[str, tuple], runs_after: dict[str, tuple], reason: str) -> list[str]:
        """Commit a defragmentation (``kvbroker.core.paged_defrag``) whose bytes were
        copied: each sequence still holding ``runs_before`` (unpinned) gets
        ``runs_after``, a new epoch and a ``moved`` event for its holders; one freed or
        pinned meanwhile is skipped (its target blocks stay free). Returns the moved ids."""
        moved = []
        for seq_id, before in runs_before.items():
            seq = self._sequences.get(seq_id)
            if seq is None or seq.pinned or tuple(seq.runs) != tuple(before):
                continue
            seq.runs = [tuple(run) for run in runs_after[seq_id]]
            seq.epoch += 1
            moved.append(seq_id)
            self._events.append(SequenceEvent("moved", seq_id, frozenset(seq.holders), seq.epoch, reason))
        self._starts, self._free = [], {}
        self._give_back(sorted(self._unheld_runs()))
        return moved

    def _unheld_runs(self) -> list[tuple[int, int]]:
        held = [False] * self.num_blocks
        for seq in self._sequences.values():
            for start, count in seq.runs:
                held[start:start + count] = [True] * count
        return [(b, 1) for b, h in enumerate(held) if not h]

    def victims(self, blocks: int, priority: int) -> list[str]:
        """Unpinned sequences of a priority below ``priority``, least recently used
        first (lowest priority first), whose blocks with the free ones make ``blocks``;
        empty when even all of them would not."""
        if blocks <= self._free_blocks:
            return []
        order = sorted((s for s in self._sequences.values() if not s.pinned and s.priority < priority),
                       key=lambda s: (s.priority, s.last_use))  # fmt: skip
        chosen, total = [], self._free_blocks
        for seq in order:
            chosen.append(seq.seq_id)
            total += seq.blocks
            if total >= blocks:
                return chosen
        return []

    def headroom(self, extra: int, need: int, generated: int) -> int:
        """Blocks granted beyond ``need``: at most ``extra``, at most the blocks of the
        ``generated`` tokens (one at least), that scaled by the free fraction that
        remains after ``need`` and rounded to the nearest block (truncating gave a young
        sequence no headroom at all in a pool 99 % free: 1 x 0.99 -> 0, so each of its
        first blocks cost a grant that waited); never more than the free blocks."""
        spare = self._free_blocks - need
        if extra <= 0 or spare <= 0:
            return 0
        grown = min(extra, max(1, generated // self.block_tokens))
        return min(spare, (2 * grown * spare + self.num_blocks) // (2 * self.num_blocks))

    # -- internals ----------------------------------------------------------------------

    def _check_counts(self, used: int, needed: int, wanted: int | None, max_tokens: int) -> int:
        for name, value in (("tokens_used", used), ("tokens_needed", needed), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(name, f"must be a non-negative integer, got {value!r}")
        if needed < used:
            raise InvalidArgument("tokens_needed", f"must be at least tokens_used ({used}), got {needed}")
        if max_tokens and needed > max_tokens:
            raise InvalidArgument("tokens_needed", f"{needed} is more than the sequence's max_tokens ({max_tokens})")
        wanted = needed if wanted is None else max(wanted, needed)
        return min(wanted, max_tokens) if max_tokens else wanted

    def _refuse(self, tokens: int, *, satisfiable: bool = True) -> None:
        free = self._free_blocks * self.block_tokens
        whole = self.blocks_for(tokens) * self.block_tokens
        why = "" if satisfiable else f"; the pool holds {self.num_blocks * self.block_tokens} tokens in all"
        raise OutOfTokens(f"out of tokens: {whole} tokens requested, {free} tokens free{why}",
                          tokens_requested=whole, tokens_free=free, satisfiable=satisfiable)  # fmt: skip

    def _take(self, seq: Sequence, blocks: int) -> None:
        """Move ``blocks`` free blocks (there are enough) to the end of ``seq``: in place
        after its last run first, then the best-fitting run, then the largest runs."""
        if seq.runs:
            start, count = seq.runs[-1]
            after = self._free.get(start + count)
            if after:
                took = min(after, blocks)
                self._remove_free(start + count, took)
                seq.runs[-1] = (start, count + took)
                blocks -= took
        while blocks:
            fits = [s for s in self._starts if self._free[s] >= blocks]
            start = min(fits, key=lambda s: (self._free[s], s)) if fits else max(self._starts, key=lambda s: (self._free[s], -s))
            took = min(self._free[start], blocks)
            self._remove_free(start, took)
            if seq.runs and seq.runs[-1][0] + seq.runs[-1][1] == start:
                seq.runs[-1] = (seq.runs[-1][0], seq.runs[-1][1] + took)
            else:
                seq.runs.append((start, took))
            blocks -= took

    def _remove_free(self, start: int, count: int) -> None:
        """Take the first ``count`` blocks of the free run at ``start``."""
        size = self._free.pop(start)
        index = bisect.bisect_left(self._starts, start)
        del self._starts[index]
        if size > count:
            self._free[start + count] = size - count
            self._starts.insert(index, start + count)
        self._free_blocks -= count

    def _give_back(self, runs: Iterable[tuple[int, int]]) -> None:
        for start, count in runs:
            index = bisect.bisect_left(self._starts, start)
            if index and self._starts[index - 1] + self._free[self._starts[index - 1]] == start:
                index -= 1
                start, count = self._starts[index], self._free.pop(self._starts[index]) + count
                del self._starts[index]
            if index < len(self._starts) and self._starts[index] == start + count:
                count += self._free.pop(self._starts[index])
                del self._starts[index]
            self._starts.insert(index, start)
            self._free[start] = count
        self._free_blocks = sum(self._free.values())

    def _sequence(self, seq_id: str) -> Sequence:
        seq = self._sequences.get(seq_id)
        if seq is None:
            raise NotFound(f"no sequence {seq_id!r} in this pool")
        return seq

    def _view(self, seq: Sequence) -> SequenceView:
        return SequenceView(
            seq.seq_id, tuple(seq.runs), seq.tokens_used, seq.blocks * self.block_tokens, seq.max_tokens,
            seq.priority, seq.pinned, tuple(sorted(seq.holders)), seq.epoch,
        )  # fmt: skip

    def check(self) -> None:
        """Raise ``AssertionError`` unless every invariant of the module docstring holds."""
        owner = [""] * self.num_blocks
        assert self._starts == sorted(self._free), "free starts out of order"
        previous_end = -1
        for start in self._starts:
            count = self._free[start]
            assert count > 0 and start > previous_end, f"free run {start}+{count} empty, overlapping or not coalesced"
            previous_end = start + count
            for b in range(start, start + count):
                owner[b] = "."
        assert self._free_blocks == sum(self._free.values()), "free block count drifted"
        for seq in self._sequences.values():
            if seq.max_tokens:
                assert seq.blocks <= self.blocks_for(seq.max_tokens), f"{seq.seq_id} beyond max_tokens"
            for start, count in seq.runs:
                assert count > 0
                for b in range(start, start + count):
                    assert owner[b] == "", f"block {b} owned twice ({owner[b]!r}, {seq.seq_id!r})"
                    owner[b] = seq.seq_id
        assert all(owner), "a block is neither free nor held"
