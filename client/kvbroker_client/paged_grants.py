"""A paged sequence as the client holds it, and when it asks for blocks ahead of need.

Why ahead: a grant is one unary RPC (``ExtendSequence``), 0.7-0.95 ms on the project's
2-core VM over the Unix socket (a bare ``Stats`` costs as much), and an append that
waited on it paid that in full: 4.7 us per token averaged over a 1,000-token sequence
(``benchmarks/paged.py``). So when a sequence has used half of what its last grant
left it, the pool sends the next grant without waiting (a *grant ahead*: nothing
needed yet, headroom wanted; the broker gives what the pool can spare, nothing when it
is nearly full, ``kvbroker.core.paged.PagedArena.extend``), and takes the answer when
the blocks it has run out, by which time it has long arrived. The append path itself
compares one integer (``Sequence.check_at``).

Invariants:

* the client's block table is a prefix of the broker's: the broker only appends blocks
  to a sequence, except a defragment, which arrives as MOVED and drops the table and
  any grant in flight (an answer that does not extend the table is dropped too);
* at most one grant ahead in flight per sequence, none sent twice for the same table;
* no grant ahead while the pool has nothing to spare: one that brought no block, or a
  grant that brought no more than its need, stops them until a grant brings headroom
  again (else a nearly full pool would answer two RPCs per block instead of one);
* a grant ahead that fails changes nothing: when the blocks run out the grant is asked
  for again, waited on, and its error is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvbroker.v1 import broker_pb2 as pb

__all__ = ["Sequence", "ahead_request", "extends", "table_of"]


@dataclass(slots=True)
class Sequence:
    """One sequence: its block table, tokens used (written), ``max_tokens`` (0: none).

    ``check_at``: the token index from which an append takes the slow path (the blocks
    run out, or a grant ahead is due); ``pending``: the grant ahead in flight (an object
    with ``done()``, and ``result()`` or awaitable, by pool kind); ``ahead_for``: the
    table length the last grant ahead was sent for; ``ahead_off``: the pool had nothing
    to spare at the last grant.
    """

    table: list[int]
    used: int
    max_tokens: int
    pinned: bool = False
    runs: list[tuple[int, int]] = field(default_factory=list)
    check_at: int = 0
    pending: Any = None
    ahead_for: int = -1
    ahead_off: bool = False

    def capacity(self, block_tokens: int) -> int:
        return len(self.table) * block_tokens

    def set_table(self, response: pb.Sequence, block_tokens: int, *, needed: int | None = None) -> None:
        """Take the broker's table and plan the next look: halfway through what is left.
        ``needed``: the tokens a grant was asked to hold (None: no grant, e.g. an
        attach); 0 for a grant ahead. Whether it brought more sets ``ahead_off``."""
        before = len(self.table)
        self.table, self.runs = table_of(response), [(run.first_block, run.count) for run in response.runs]
        if needed is not None:
            floor = max(before, -(-needed // block_tokens))
            self.ahead_off = len(self.table) <= floor
        self.replan(block_tokens)

    def replan(self, block_tokens: int) -> None:
        capacity = self.capacity(block_tokens)
        if self.pending is not None or self.ahead_off or self.ahead_for == len(self.table):
            self.check_at = capacity  # an answer is coming, none is worth asking, or it was asked
        else:
            self.check_at = min(capacity, self.used + max(0, capacity - self.used) // 2)


def table_of(response: pb.Sequence) -> list[int]:
    return [b for run in response.runs for b in range(run.first_block, run.first_block + run.count)]


def extends(seq: Sequence, response: pb.Sequence) -> bool:
    """Whether the broker's table in ``response`` starts with the client's (see the
    invariants): only then may it replace it."""
    table = table_of(response)
    return len(table) >= len(seq.table) and table[: len(seq.table)] == seq.table


def ahead_request(pool: str, seq_id: str, seq: Sequence, block_tokens: int, grant_tokens: int) -> pb.ExtendSequenceRequest | None:
    """The grant ahead to send now, or None: no grants wanted (``grant_tokens`` 0), the
    pool had nothing to spare, one in flight or already sent for this table, or the
    sequence is at ``max_tokens``."""
    if not grant_tokens or seq.ahead_off or seq.pending is not None or seq.ahead_for == len(seq.table):
        return None
    held = seq.capacity(block_tokens)
    if seq.max_tokens:
        held = min(held, seq.max_tokens)
        if seq.used >= seq.max_tokens or held >= seq.max_tokens:
            return None
    needed = max(seq.used, held)
    wanted = needed + block_tokens + grant_tokens  # what a grant at the need would ask: the next block and as many
    seq.ahead_for = len(seq.table)
    return pb.ExtendSequenceRequest(
        pool=pool, sequence_id=seq_id, tokens_used=seq.used, tokens_needed=needed,
        tokens_wanted=min(wanted, seq.max_tokens) if seq.max_tokens else wanted,
    )  # fmt: skip
