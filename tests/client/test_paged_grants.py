"""The grant-ahead rules of a paged sequence (``kvbroker_client.paged_grants``), pure:
when a grant ahead is due, what it asks, when none is sent, and when an answer may
replace the block table."""

from __future__ import annotations

from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client.paged_grants import Sequence, ahead_request, extends

BT = 16


def view(*runs: tuple[int, int]) -> pb.Sequence:
    return pb.Sequence(runs=[pb.BlockRun(first_block=first, count=count) for first, count in runs])


def sequence(used: int, *runs: tuple[int, int], max_tokens: int = 0) -> Sequence:
    seq = Sequence([], used, max_tokens)
    seq.set_table(view(*runs), BT)
    return seq


def test_a_grant_ahead_is_due_halfway_through_what_the_table_leaves():
    seq = sequence(10, (0, 4))  # 64 tokens held, 10 used: 54 left, due at 10 + 27
    assert seq.check_at == 37
    request = ahead_request("kv", "s", seq, BT, 512)
    assert (request.tokens_used, request.tokens_needed, request.tokens_wanted) == (10, 64, 64 + BT + 512)
    assert ahead_request("kv", "s", seq, BT, 512) is None, "never twice for the same table"
    seq.replan(BT)
    assert seq.check_at == 64, "after sending, the next look is when the blocks run out"


def test_no_grant_ahead_without_grants_at_max_tokens_or_while_one_is_in_flight():
    assert ahead_request("kv", "s", sequence(0, (0, 1)), BT, 0) is None
    assert ahead_request("kv", "s", sequence(40, (0, 4), max_tokens=64), BT, 512) is None
    capped = ahead_request("kv", "s", sequence(40, (0, 4), max_tokens=100), BT, 512)
    assert (capped.tokens_needed, capped.tokens_wanted) == (64, 100)
    busy = sequence(0, (0, 2))
    busy.pending = object()
    assert ahead_request("kv", "s", busy, BT, 512) is None


def test_a_pool_with_nothing_to_spare_stops_grants_ahead_until_a_grant_brings_headroom():
    seq = sequence(16, (0, 1))
    seq.set_table(view((0, 2)), BT, needed=17)  # exactly the need: the pool is tight
    assert seq.ahead_off and ahead_request("kv", "s", seq, BT, 512) is None
    assert seq.check_at == 32, "no ahead planned: the next look is when the blocks run out"
    seq.set_table(view((0, 5)), BT, needed=33)  # three blocks beyond the need
    assert not seq.ahead_off and ahead_request("kv", "s", seq, BT, 512) is not None
    seq.pending = None
    seq.set_table(view((0, 5)), BT, needed=0)  # a grant ahead that brought nothing
    assert seq.ahead_off


def test_an_answer_replaces_the_table_only_if_it_extends_it():
    seq = sequence(0, (3, 2))
    assert extends(seq, view((3, 2), (9, 1)))
    assert extends(seq, view((3, 4)))
    assert not extends(seq, view((0, 3))), "a defragment moved the blocks: a stale answer"
    assert not extends(seq, view((3, 1))), "shorter than what the client holds"
