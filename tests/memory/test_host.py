"""The host backend, for real: /dev/shm objects, mappings in other processes, memmove,
memset. Copy failures are in ``test_copy_faults.py``, ownership and stale objects in
``test_host_owner.py``, descriptor and mapping limits in ``test_host_limits.py``."""

from __future__ import annotations

import ctypes
import os
import random
import stat
import struct
import threading
import uuid

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbroker.core.errors import ResourceExhausted
from kvbroker.core.types import Extent, Move, SegmentInfo
from kvbroker.memory.backend import HostHandle, SegmentMemory
from kvbroker.memory.host import HostMemory
from kvbroker.v1 import broker_pb2
from kvbroker_client.mapping import HandleError, SegmentMapper, StaleHandleError
from tests.support.segments import read_segment, write_segment

PAGE = 4096


def segment(segment_id: int, nbytes: int, generation: int = 1) -> SegmentInfo:
    return SegmentInfo(segment_id=segment_id, generation=generation, pool="default", device_id="host", nbytes=nbytes)


def wire_handle(mem: HostMemory, segment_id: int, byte_offset: int, nbytes: int, **host_overrides: int) -> broker_pb2.Handle:
    """What the server layer would send: the backend's handle plus the cache's range."""
    h = mem.handle(segment_id)
    fields = dict(shm_name=h.shm_name, size_bytes=h.size_bytes, st_dev=h.st_dev, st_ino=h.st_ino, shm_dir=h.shm_dir)
    fields.update(host_overrides)
    return broker_pb2.Handle(
        instance_id=mem.instance_id,
        server_pid=os.getpid(),
        segment_id=segment_id,
        segment_generation=1,
        byte_offset=byte_offset,
        nbytes=nbytes,
        host=broker_pb2.HostSegmentHandle(**fields),
    )


@pytest.fixture
def mem():
    with HostMemory(f"t{uuid.uuid4().hex[:12]}") as memory:
        yield memory


def shm_path(mem: HostMemory, segment_id: int) -> str:
    return os.path.join(mem.shm_dir, mem.handle(segment_id).shm_name)


def test_satisfies_the_protocol(mem):
    assert isinstance(mem, SegmentMemory)


def test_new_segment_is_zeroed_0600_and_named_by_pid_instance_id_generation(mem):
    mem.create(segment(3, 5 * PAGE + 100, generation=7))
    handle = mem.handle(3)
    assert isinstance(handle, HostHandle)
    assert handle.shm_name == f"kvb-{os.getpid()}-{mem.instance_id}-3-7"
    assert handle.shm_dir == "/dev/shm"
    st_ = os.stat(shm_path(mem, 3))
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert (st_.st_dev, st_.st_ino, handle.size_bytes) == (handle.st_dev, handle.st_ino, 5 * PAGE + 100)
    assert st_.st_blocks * 512 >= 5 * PAGE  # reserved up front by posix_fallocate
    assert read_segment(mem, 3) == bytes(handle.size_bytes)


def test_another_process_maps_zero_copy_both_ways(mem, map_in_child):
    mem.create(segment(1, 16 * PAGE))
    write_segment(mem, 1, 4096, b"written by the broker")
    child = map_in_child(wire_handle(mem, 1, 4096, 8192).SerializeToString())

    assert child.read(0, 21) == b"written by the broker"
    write_segment(mem, 1, 4096 + 100, b"after the child mapped")  # no copy was taken at map time
    assert child.read(100, 22) == b"after the child mapped"
    child.write(5000, b"written by the client")
    assert read_segment(mem, 1, 4096 + 5000, 21) == b"written by the client"


def test_copy_applies_moves_in_order_with_memmove_semantics(shm_dir):
    sizes = {1: 3 * PAGE, 2: 2 * PAGE + 17}

    @settings(max_examples=60, deadline=None)
    @given(seed=st.integers(0, 2**32), raw_moves=st.lists(st.tuples(*[st.integers(0, 2**20)] * 5), max_size=6))
    def check(seed, raw_moves):
        rng = random.Random(seed)
        model = {sid: bytearray(rng.randbytes(n)) for sid, n in sizes.items()}
        moves = []
        for a, b, c, d, e in raw_moves:
            src_seg, dst_seg = 1 + a % 2, 1 + b % 2
            n = c % (min(sizes[src_seg], sizes[dst_seg]) + 1)
            so, do = d % (sizes[src_seg] - n + 1), e % (sizes[dst_seg] - n + 1)
            moves.append(Move("c", Extent(src_seg, so, n), Extent(dst_seg, do, n)))
        with HostMemory(f"h{uuid.uuid4().hex[:12]}", shm_dir=shm_dir) as memory:
            for sid, n in sizes.items():
                memory.create(segment(sid, n))
                write_segment(memory, sid, 0, model[sid])
            memory.copy(moves)
            for move in moves:
                data = bytes(model[move.source.segment_id][move.source.offset : move.source.end])
                model[move.destination.segment_id][move.destination.offset : move.destination.end] = data
            for sid, n in sizes.items():
                assert read_segment(memory, sid) == model[sid]

    check()


def test_overlapping_slide_down_and_up_inside_one_segment(mem):
    mem.create(segment(1, 4 * PAGE))
    data = bytes(range(256)) * 64
    write_segment(mem, 1, 0, data)
    mem.copy([Move("a", Extent(1, 1000, 8000), Extent(1, 10, 8000))])  # slide down, overlapping
    expected = bytearray(data)
    expected[10:8010] = data[1000:9000]
    assert read_segment(mem, 1) == expected
    mem.copy([Move("a", Extent(1, 10, 8000), Extent(1, 3000, 8000))])  # slide up, overlapping
    expected[3000:11000] = bytes(expected[10:8010])
    assert read_segment(mem, 1) == expected


def test_a_bad_move_changes_nothing(mem):
    mem.create(segment(1, PAGE))
    write_segment(mem, 1, 0, b"x" * PAGE)
    good = Move("a", Extent(1, 0, 10), Extent(1, 100, 10))
    with pytest.raises(ValueError, match="outside segment 1"):
        mem.copy([good, Move("b", Extent(1, 0, 10), Extent(1, PAGE - 5, 10))])
    with pytest.raises(ValueError, match="source has 10 bytes"):
        mem.copy([good, Move("b", Extent(1, 0, 10), Extent(1, 0, 11))])
    with pytest.raises(KeyError, match="segment 9"):
        mem.copy([good, Move("b", Extent(9, 0, 10), Extent(1, 0, 10))])
    assert read_segment(mem, 1) == b"x" * PAGE


def test_free_unlinks_and_is_idempotent_while_a_client_keeps_its_mapping(mem):
    mem.create(segment(1, 2 * PAGE))
    write_segment(mem, 1, 0, b"still here")
    path = shm_path(mem, 1)
    mapper = SegmentMapper()
    view = mapper.view(wire_handle(mem, 1, 0, 2 * PAGE))
    mem.free(1)
    mem.free(1)
    assert not os.path.exists(path)
    assert bytes(view[:10].tolist()) == b"still here"  # an existing mapping stays valid
    with pytest.raises(KeyError):
        mem.handle(1)
    fresh = SegmentMapper()
    with pytest.raises(StaleHandleError, match="does not exist"):
        fresh.view(wire_handle_for_name(path))


def wire_handle_for_name(path: str) -> broker_pb2.Handle:
    return broker_pb2.Handle(
        instance_id="x",
        segment_id=1,
        segment_generation=1,
        nbytes=1,
        host=broker_pb2.HostSegmentHandle(shm_name=os.path.basename(path), size_bytes=1),
    )


def test_close_frees_everything_and_refuses_new_segments(mem):
    mem.create(segment(1, PAGE))
    mem.create(segment(2, PAGE))
    paths = [shm_path(mem, 1), shm_path(mem, 2)]
    mem.close()
    mem.close()
    assert not any(os.path.exists(p) for p in paths)
    with pytest.raises(ValueError, match="closed"):
        mem.create(segment(3, PAGE))


def test_creating_over_an_existing_name_fails_and_leaves_it_alone(mem):
    path = os.path.join(mem.shm_dir, mem.object_name(5, 2))
    with open(path, "wb") as f:
        f.write(b"someone else's")
    try:
        with pytest.raises(FileExistsError):
            mem.create(segment(5, PAGE, generation=2))
        with open(path, "rb") as f:
            assert f.read() == b"someone else's"
        assert mem.segment_ids() == []
    finally:
        os.unlink(path)


def test_duplicate_segment_id_and_bad_sizes_are_refused(mem):
    mem.create(segment(1, PAGE))
    with pytest.raises(ValueError, match="already exists"):
        mem.create(segment(1, PAGE, generation=2))
    with pytest.raises(ValueError, match="positive"):
        mem.create(segment(2, 0))
    with pytest.raises(ValueError, match="outside segment"):
        mem.zero(1, PAGE - 1, 2)
    with pytest.raises(ValueError, match="instance_id"):
        HostMemory("no/slash")


def _shm_is_tmpfs(directory: str) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == directory and line.split()[2] == "tmpfs" for line in mounts)


@pytest.mark.skipif(not _shm_is_tmpfs("/dev/shm"), reason="needs /dev/shm on a size-limited tmpfs")
def test_no_room_in_dev_shm_is_resource_exhausted_and_leaves_nothing(mem):
    vfs = os.statvfs(mem.shm_dir)
    if vfs.f_blocks == 0:
        pytest.skip("/dev/shm has no size limit")
    too_big = vfs.f_blocks * vfs.f_frsize + 1024 * PAGE  # tmpfs refuses this up front
    with pytest.raises(ResourceExhausted) as info:
        mem.create(segment(1, too_big))
    assert info.value.satisfiable is False and info.value.requested_bytes == too_big
    assert not os.path.exists(os.path.join(mem.shm_dir, mem.object_name(1, 1)))


def test_mapper_refuses_a_handle_with_the_wrong_inode(mem):
    mem.create(segment(1, PAGE))
    good = wire_handle(mem, 1, 0, PAGE)
    with pytest.raises(StaleHandleError, match="another object"):
        SegmentMapper().view(wire_handle(mem, 1, 0, PAGE, st_ino=good.host.st_ino + 1))
    with pytest.raises(StaleHandleError, match="fewer than"):
        SegmentMapper().view(wire_handle(mem, 1, 0, PAGE, size_bytes=2 * PAGE))
    with pytest.raises(HandleError, match="does not match"):
        SegmentMapper().view(wire_handle(mem, 1, 0, PAGE, shm_name="../etc/passwd"))


def test_mapper_maps_each_segment_once_and_builds_typed_views(mem):
    mem.create(segment(1, 4 * PAGE))
    write_segment(mem, 1, 256, struct.pack("<6f", *range(6)))
    mapper = SegmentMapper(populate=False)
    handle = wire_handle(mem, 1, 256, 24)
    floats = mapper.view(handle, torch.float32, (2, 3))
    assert floats.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    floats[1, 2] = 42.0  # the broker sees a client's write at once
    assert struct.unpack("<f", read_segment(mem, 1, 256 + 20, 4)) == (42.0,)
    assert mapper.view(handle, torch.float32).shape == (6,)
    assert mapper.view(handle).shape == (24,)
    assert len(mapper) == 1 and mapper.segment(handle).numel() == 4 * PAGE
    with pytest.raises(HandleError, match="needs 28 bytes"):
        mapper.view(handle, torch.float32, (7,))
    with pytest.raises(HandleError, match="not a multiple"):
        mapper.view(wire_handle(mem, 1, 258, 24), torch.float32, (2,))
    with pytest.raises(HandleError, match="exceeds its segment"):
        mapper.view(wire_handle(mem, 1, 4 * PAGE - 8, 16))
    with pytest.raises(HandleError, match="no segment"):
        mapper.view(broker_pb2.Handle(instance_id="x"))
    key = SegmentMapper.key_of(handle)
    mapper.retire(key)
    assert len(mapper) == 0 and mapper.still_mapped(key), "retired, but a view still uses it"
    assert floats[0, 1].item() == 1.0  # retiring the cache entry leaves views valid


# ---- zero ---------------------------------------------------------------------------


def test_zero_clears_exactly_the_range_and_a_client_sees_it(mem):
    mem.create(segment(1, 4 * PAGE))
    data = bytes(range(1, 256)) * 65
    write_segment(mem, 1, 0, data[: 4 * PAGE])
    mapper = SegmentMapper()
    view = mapper.view(wire_handle(mem, 1, 0, 4 * PAGE))  # a client's mapping, made before
    mem.zero(1, 1000, 5000)
    expected = bytearray(data[: 4 * PAGE])
    expected[1000:6000] = bytes(5000)
    assert read_segment(mem, 1) == expected
    assert bytes(view[990:1010].tolist()) == bytes(expected[990:1010])
    mem.zero(1, 4 * PAGE, 0)  # an empty range at the end is fine
    mem.zero(1, 0, 4 * PAGE)
    assert read_segment(mem, 1) == bytes(4 * PAGE)


def test_zero_refuses_bad_ranges_and_unknown_segments(mem):
    mem.create(segment(1, PAGE))
    for offset, nbytes in [(-1, 1), (0, PAGE + 1), (PAGE, 1), (5, -1)]:
        with pytest.raises(ValueError, match="outside segment 1"):
            mem.zero(1, offset, nbytes)
    with pytest.raises(KeyError, match="segment 2"):
        mem.zero(2, 0, 1)


def test_zero_releases_the_gil():
    # ctypes releases the GIL around a foreign call unless the function was declared with
    # PYFUNCTYPE (FUNCFLAG_PYTHONAPI); memset and memmove are plain CFUNCTYPE functions.
    for function in (ctypes.memset, ctypes.memmove):
        assert not function._flags_ & ctypes._FUNCFLAG_PYTHONAPI


class BlockingZero(HostMemory):
    """Holds its first ``zero`` (inside the backend, segment in use) until released."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.zeroing = threading.Event()
        self.release = threading.Event()

    def _memset(self, address, nbytes):
        if not self.zeroing.is_set():
            self.zeroing.set()
            assert self.release.wait(timeout=60)
        super()._memset(address, nbytes)


def test_free_waits_for_a_zero_in_flight_before_unmapping(shm_dir):
    with BlockingZero("blocking", shm_dir=shm_dir) as memory:
        memory.create(segment(1, PAGE))
        path = os.path.join(shm_dir, memory.handle(1).shm_name)
        write_segment(memory, 1, 0, b"\xff" * PAGE)
        zeroing = threading.Thread(target=memory.zero, args=(1, 0, PAGE))
        zeroing.start()
        assert memory.zeroing.wait(timeout=60)
        with open(path, "rb") as f:
            assert f.read() == b"\xff" * PAGE  # not zeroed yet: the zero is held
        freeing = threading.Thread(target=memory.free, args=(1,))
        freeing.start()
        while memory.segment_ids():  # free took the segment out of the table...
            freeing.join(timeout=0.01)
        assert freeing.is_alive() and os.path.exists(path)  # ...and waits for the zero
        with open(path, "rb") as f:
            memory.release.set()
            zeroing.join(timeout=60)
            freeing.join(timeout=60)
            assert not freeing.is_alive() and not os.path.exists(path)
            assert f.read() == bytes(PAGE)  # the zero ran on mapped memory, then free unmapped


def test_another_segment_can_be_zeroed_while_one_is_being_zeroed(shm_dir):
    with BlockingZero("parallel", shm_dir=shm_dir) as memory:
        memory.create(segment(1, PAGE))
        memory.create(segment(2, PAGE))
        write_segment(memory, 2, 0, b"\xff" * PAGE)
        zeroing = threading.Thread(target=memory.zero, args=(1, 0, PAGE))
        zeroing.start()
        assert memory.zeroing.wait(timeout=60)
        memory.zero(2, 0, PAGE)  # not blocked by the zero in flight on 1
        assert read_segment(memory, 2) == bytes(PAGE)
        memory.release.set()
        zeroing.join(timeout=60)
