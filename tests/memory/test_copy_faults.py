"""The copy contract under failure, on the host backend with real shm segments.

``HostMemory._copy_range`` is the primitive every byte of a ``copy`` goes through; the
subclass below makes its k-th call scribble over part of its destination and fail, the
worst a device copy can do. Whatever k is, the contract must hold: ``CopyError.completed``
moves are done, the failed move's source is intact, every byte outside its destination is
as the completed prefix left it. The plan runner is shared with the CUDA backend, so this
covers its recovery logic too.
"""

from __future__ import annotations

import ctypes
import errno
import random
import threading
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbroker.core.types import Extent, Move, SegmentInfo
from kvbroker.memory.backend import CopyError
from kvbroker.memory.host import HostMemory
from tests.support.segments import read_segment, write_segment

SIZES = {1: 700, 2: 333}


class FaultyHost(HostMemory):
    """Small thresholds (so tiny segments chunk and stage) and an injectable fault."""

    DIRECT_CHUNK_MIN_BYTES = 48
    STAGING_BYTES = 40

    def __init__(self, *args, fail_at: int = 0, fail_after: bool = False, damage: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.fail_at = fail_at  # 1-based index of the failing call; 0: never
        self.fail_after = fail_after  # every later call fails too (a broken device)
        self.damage = damage  # the fraction of the destination written before failing
        self.events: list[str] = []

    def _copy_range(self, destination, source, nbytes):
        self.calls += 1
        self.events.append("copy")
        if self.fail_at and (self.calls == self.fail_at or (self.fail_after and self.calls > self.fail_at)):
            ctypes.memset(destination, 0xEE, int(nbytes * self.damage))
            raise OSError(errno.EIO, f"injected failure of copy call {self.calls}")
        super()._copy_range(destination, source, nbytes)


class ParallelFaultyHost(FaultyHost):
    """The same faults with ranges of 24 bytes and more split into pieces that four
    threads copy at once: the k-th call (counted under a lock) is whichever piece comes
    k-th, and the contract must hold all the same."""

    PARALLEL_MIN_BYTES = 24
    PARALLEL_PIECE_ALIGN = 8

    def __init__(self, *args, **kwargs):
        super().__init__(*args, copy_threads=4, **kwargs)
        self._count_lock = threading.Lock()

    def _copy_range(self, destination, source, nbytes):
        with self._count_lock:
            self.calls += 1
            call = self.calls
        if self.fail_at and (call == self.fail_at or (self.fail_after and call > self.fail_at)):
            ctypes.memset(destination, 0xEE, int(nbytes * self.damage))
            raise OSError(errno.EIO, f"injected failure of copy call {call}")
        HostMemory._copy_range(self, destination, source, nbytes)


def info(segment_id: int, nbytes: int) -> SegmentInfo:
    return SegmentInfo(segment_id=segment_id, generation=1, pool="p", device_id="host", nbytes=nbytes)


def memory(shm_dir: str, kind: type[FaultyHost] = FaultyHost, **faults) -> FaultyHost:
    mem = kind(f"f{uuid.uuid4().hex[:12]}", shm_dir=shm_dir, **faults)
    for sid, n in SIZES.items():
        mem.create(info(sid, n))
    return mem


def fill(mem: HostMemory, seed: int) -> dict[int, bytearray]:
    rng = random.Random(seed)
    model = {sid: bytearray(rng.randbytes(n)) for sid, n in SIZES.items()}
    for sid, data in model.items():
        write_segment(mem, sid, 0, data)
    return model


def apply(model: dict[int, bytearray], move: Move) -> None:
    data = bytes(model[move.source.segment_id][move.source.offset : move.source.end])
    model[move.destination.segment_id][move.destination.offset : move.destination.end] = data


def assert_prefix_state(mem: HostMemory, model: dict[int, bytearray], moves: list[Move], completed: int) -> None:
    """Moves 0..completed-1 applied; move ``completed``'s destination outside its source is
    free space (anything goes); every other byte as the prefix left it."""
    expected = {sid: bytearray(data) for sid, data in model.items()}
    for move in moves[:completed]:
        apply(expected, move)
    actual = {sid: bytearray(read_segment(mem, sid)) for sid in SIZES}
    if completed < len(moves):
        failed = moves[completed]
        dst, src = failed.destination, failed.source
        for i in range(dst.offset, dst.end):
            if not (src.segment_id == dst.segment_id and src.offset <= i < src.end):
                actual[dst.segment_id][i] = expected[dst.segment_id][i]
    for sid in SIZES:
        assert actual[sid] == expected[sid], f"segment {sid} differs"


def random_moves(raw: list[tuple[int, ...]]) -> list[Move]:
    moves = []
    for a, b, c, d, e in raw:
        src_seg, dst_seg = 1 + a % 2, 1 + b % 2
        if a % 3 == 0:
            dst_seg = src_seg  # many same-segment (often overlapping) moves
        n = c % (min(SIZES[src_seg], SIZES[dst_seg]) + 1)
        so = d % (SIZES[src_seg] - n + 1)
        do = e % (SIZES[dst_seg] - n + 1)
        if a % 5 == 0 and src_seg == dst_seg:  # a near slide: staged chunks
            do = max(0, min(SIZES[dst_seg] - n, so + (e % 61) - 30))
        moves.append(Move(f"c{len(moves)}", Extent(src_seg, so, n), Extent(dst_seg, do, n)))
    return moves


@pytest.mark.parametrize("kind", [FaultyHost, ParallelFaultyHost])
def test_any_failing_copy_call_leaves_a_committable_prefix(shm_dir, kind):
    @settings(max_examples=150, deadline=None)
    @given(
        seed=st.integers(0, 2**32),
        raw=st.lists(st.tuples(*[st.integers(0, 2**20)] * 5), min_size=1, max_size=5),
        fail_pick=st.integers(0, 2**20),
        damage=st.sampled_from([0.0, 0.5, 1.0]),
    )
    def check(seed, raw, fail_pick, damage):
        moves = random_moves(raw)
        with memory(shm_dir, kind) as clean:
            model = fill(clean, seed)
            clean.copy(moves)
            total_calls = clean.calls
            assert_prefix_state(clean, model, moves, len(moves))  # pieces or not: memmove
        if total_calls == 0:
            return
        fail_at = 1 + fail_pick % total_calls
        with memory(shm_dir, kind, fail_at=fail_at, damage=damage) as mem:
            model = fill(mem, seed)
            with pytest.raises(CopyError) as caught:
                mem.copy(moves)
            err = caught.value
            assert 0 <= err.completed < len(moves)
            assert err.source_intact and isinstance(err.cause, OSError)
            assert_prefix_state(mem, model, moves, err.completed)

    check()


def test_a_failed_cross_segment_move_keeps_the_prefix_and_every_other_cache(shm_dir):
    moves = [
        Move("a", Extent(1, 100, 50), Extent(1, 0, 50)),
        Move("b", Extent(2, 0, 80), Extent(1, 200, 80)),  # fails
        Move("c", Extent(2, 100, 10), Extent(2, 300, 10)),  # never runs
    ]
    with memory(shm_dir, fail_at=2) as mem:
        model = fill(mem, 1)
        with pytest.raises(CopyError) as caught:
            mem.copy(moves)
        assert caught.value.completed == 1 and caught.value.source_intact
        assert "move 1 of the copy plan failed" in str(caught.value)
        assert caught.value.__cause__ is caught.value.cause
        assert_prefix_state(mem, model, moves, 1)
        assert read_segment(mem, 1, 200, 80) == b"\xee" * 80  # garbage only in free space


@pytest.mark.parametrize(
    ("name", "move", "fail_at"),
    [
        # slide down by 10 (< DIRECT_CHUNK_MIN_BYTES): staged chunks of 40, forward;
        # call 4 writes the second chunk back from staging over its own source.
        ("staged slide down", Move("s", Extent(1, 110, 200), Extent(1, 100, 200)), 4),
        # slide up by 7, chunks from the end, fails on the third chunk's stage-out.
        ("staged slide up", Move("s", Extent(1, 100, 200), Extent(1, 107, 200)), 6),
        # slide down by 60 (direct chunks of 60): the third chunk overwrites the second's
        # source, whose bytes were already moved.
        ("direct slide down", Move("d", Extent(1, 160, 300), Extent(1, 100, 300)), 3),
        ("direct slide up", Move("d", Extent(1, 100, 300), Extent(1, 170, 300)), 4),
    ],
)
def test_an_overlapping_move_that_fails_midway_is_restored(shm_dir, name, move, fail_at):
    before = Move("first", Extent(2, 0, 30), Extent(2, 100, 30))
    with memory(shm_dir, fail_at=0) as probe:
        fill(probe, 3)
        probe.copy([move])
        assert probe.calls > fail_at, "the failure must land mid-move"
    with memory(shm_dir, fail_at=fail_at + 1, damage=1.0) as mem:  # +1: the call of `before`
        model = fill(mem, 3)
        with pytest.raises(CopyError) as caught:
            mem.copy([before, move])
        assert caught.value.completed == 1 and caught.value.source_intact
        assert_prefix_state(mem, model, [before, move], 1)
        src = move.source
        assert read_segment(mem, 1, src.offset, src.nbytes) == model[1][src.offset : src.end], name


def test_when_the_restore_fails_too_the_error_says_the_source_is_lost(shm_dir):
    slide = Move("s", Extent(1, 110, 200), Extent(1, 100, 200))
    with memory(shm_dir, fail_at=4, fail_after=True) as mem:
        fill(mem, 4)
        with pytest.raises(CopyError) as caught:
            mem.copy([slide])
        assert caught.value.completed == 0 and not caught.value.source_intact
        assert "bytes are lost" in str(caught.value)
    disjoint = Move("x", Extent(1, 0, 100), Extent(1, 400, 100))  # nothing to restore
    with memory(shm_dir, fail_at=1, fail_after=True) as mem:
        model = fill(mem, 5)
        with pytest.raises(CopyError) as caught:
            mem.copy([disjoint])
        assert caught.value.completed == 0 and caught.value.source_intact
        assert_prefix_state(mem, model, [disjoint], 0)


@pytest.fixture
def staging_log(monkeypatch):
    """Record each staging allocation in the memory's event list; ``refuse`` fails it."""
    from kvbroker.memory import shm

    original = shm.map_anonymous
    state = {"memory": None, "refuse": False}

    def map_anonymous(nbytes):
        state["memory"].events.append(f"staging {nbytes}")
        if state["refuse"]:
            raise OSError(errno.ENOMEM, "injected: no memory for staging")
        return original(nbytes)

    monkeypatch.setattr(shm, "map_anonymous", map_anonymous)
    return state


def test_staging_is_allocated_before_the_first_byte_moves(shm_dir, staging_log):
    moves = [
        Move("far", Extent(2, 0, 100), Extent(1, 500, 100)),  # needs no staging
        Move("near", Extent(1, 20, 150), Extent(1, 10, 150)),  # staged: 40-byte chunks
        Move("nearer", Extent(1, 200, 30), Extent(1, 199, 30)),  # staged: one 30-byte chunk
    ]
    with memory(shm_dir) as mem:
        staging_log["memory"] = mem
        mem.copy(moves)
        assert mem.events[0] == "staging 40" and mem.events.count("staging 40") == 1
        assert mem.events[1:] == ["copy"] * mem.calls


def test_no_staging_memory_means_nothing_moved(shm_dir, staging_log):
    moves = [Move("far", Extent(2, 0, 100), Extent(1, 500, 100)), Move("near", Extent(1, 20, 150), Extent(1, 10, 150))]
    staging_log["refuse"] = True
    with memory(shm_dir) as mem:
        staging_log["memory"] = mem
        model = fill(mem, 6)
        with pytest.raises(CopyError) as caught:
            mem.copy(moves)
        assert caught.value.completed == 0 and mem.calls == 0
        assert caught.value.cause.errno == errno.ENOMEM
        assert read_segment(mem, 1) == model[1] and read_segment(mem, 2) == model[2]


def test_a_failed_copy_leaves_no_segment_marked_in_use(shm_dir):
    # free waits while a copy uses a segment: the failed copy must have dropped its marks.
    with memory(shm_dir, fail_at=1) as mem:
        with pytest.raises(CopyError):
            mem.copy([Move("a", Extent(1, 0, 10), Extent(2, 0, 10))])
        mem.free(1)
        mem.free(2)
        assert mem.segment_ids() == []


def test_a_large_range_is_copied_in_pieces_by_several_threads(shm_dir):
    """300 bytes with four threads and pieces aligned to 8: four calls of 80, 80, 80, 60
    bytes, the bytes as one memmove leaves them."""
    move = Move("x", Extent(1, 0, 300), Extent(1, 350, 300))
    with memory(shm_dir, ParallelFaultyHost) as mem:
        model = fill(mem, 6)
        mem.copy([move])
        assert mem.calls == 4
        assert_prefix_state(mem, model, [move], 1)
    with memory(shm_dir) as mem:
        mem.copy([move])
        assert mem.calls == 1
