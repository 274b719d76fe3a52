"""The CUDA backend. GPU tests are marked ``cuda`` and skipped without a GPU; the chunk
planner and the allocator configuration are checked everywhere."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbroker.core.errors import ResourceExhausted
from kvbroker.core.types import MiB, Extent, Move, SegmentInfo
from kvbroker.memory.backend import CopyError
from kvbroker.memory.cuda import (
    CudaHandle,
    CudaMemory,
    configure_cuda_allocator_env,
    discover_gpus,
    plan_chunks,
)
from kvbroker.memory.cuda.refcounter import REF_COUNTER_HEADER_BYTES
from tests.support.segments import read_segment, write_segment

torch = pytest.importorskip("torch")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- everywhere --------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    nbytes=st.integers(0, 60),
    src=st.integers(0, 60),
    dst=st.integers(0, 60),
    same_segment=st.booleans(),
    direct_min=st.integers(1, 8),
    staging=st.integers(1, 8),
)
def test_plan_chunks_equals_memmove(nbytes, src, dst, same_segment, direct_min, staging):
    # Bytes are modelled by a list of ints (each value its original position); small
    # thresholds draw both the staged and the direct-chunk paths.
    size = max(src, dst) + nbytes
    memory = list(range(size))
    source = memory
    target = memory if same_segment else [-1] * size
    expected_target = list(target)
    expected_target[dst : dst + nbytes] = source[src : src + nbytes]
    plan = plan_chunks(src, dst, nbytes, same_segment=same_segment, direct_min=direct_min, staging=staging)
    for s, d, n, staged in plan:
        if same_segment and not staged:
            assert s + n <= d or d + n <= s, "a direct chunk overlaps itself"
        if staged:
            assert n <= staging
        target[d : d + n] = source[s : s + n]  # a list slice copy is staging-like
    assert target == expected_target
    assert sum(n for _, _, n, _ in plan) == (0 if same_segment and src == dst else nbytes)


def test_plan_chunks_copies_far_slides_directly_and_near_ones_staged():
    far = plan_chunks(10 * MiB, 0, 30 * MiB, same_segment=True)
    assert [c[:3] for c in far] == [(10 * MiB, 0, 10 * MiB), (20 * MiB, 10 * MiB, 10 * MiB), (30 * MiB, 20 * MiB, 10 * MiB)]
    assert not any(c[3] for c in far)
    near_up = plan_chunks(0, 4096, 100 * MiB, same_segment=True)
    assert all(c[3] for c in near_up) and near_up[0][0] > near_up[-1][0]  # backward
    assert plan_chunks(0, 0, 5, same_segment=True) == []
    assert plan_chunks(0, 0, 5, same_segment=False) == [(0, 0, 5, False)]


def test_allocator_conf_forces_expandable_segments_off_before_torch_import():
    script = (
        "import os, sys\n"
        "from kvbroker.memory.cuda import configure_cuda_allocator_env\n"
        "configure_cuda_allocator_env()\n"
        "assert 'torch' not in sys.modules\n"
        "print(os.environ['PYTORCH_CUDA_ALLOC_CONF'], os.environ.get('PYTORCH_ALLOC_CONF'))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
        clean.update(env, PYTHONPATH=root)
        return subprocess.run([sys.executable, "-c", script], env=clean, capture_output=True, text=True)

    assert run().stdout.split() == ["expandable_segments:False", "None"]
    out = run(PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:128,expandable_segments:True").stdout.split()
    assert out == ["max_split_size_mb:128,expandable_segments:False", "None"]
    out = run(PYTORCH_ALLOC_CONF="garbage_collection_threshold:0.6").stdout.split()
    assert out == ["garbage_collection_threshold:0.6,expandable_segments:False"] * 2
    refused = run(PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
    assert refused.returncode != 0 and "native caching allocator" in refused.stderr


def test_allocator_conf_after_torch_import_refuses_expandable_segments(monkeypatch):
    assert "torch" in sys.modules
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(RuntimeError, match="before importing torch"):
        configure_cuda_allocator_env()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    configure_cuda_allocator_env()  # already fine: nothing to do


def test_discover_gpus_matches_torch():
    gpus = discover_gpus()
    assert len(gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert all(g.uuid.startswith(("GPU-", "MIG-")) for g in gpus)


# ---- on a GPU ----------------------------------------------------------------------

SEGMENT = 16 * MiB


def info(segment_id: int, nbytes: int = SEGMENT) -> SegmentInfo:
    return SegmentInfo(segment_id=segment_id, generation=1, pool="default", device_id="gpu", nbytes=nbytes)


def wire_handle(mem: CudaMemory, segment_id: int, byte_offset: int, nbytes: int):
    from kvbroker.v1 import broker_pb2

    h = mem.handle(segment_id)
    return broker_pb2.Handle(
        instance_id="test",
        server_pid=os.getpid(),
        segment_id=segment_id,
        segment_generation=1,
        byte_offset=byte_offset,
        nbytes=nbytes,
        cuda=broker_pb2.CudaSegmentHandle(
            device_uuid=h.device_uuid,
            torch_version=h.torch_version,
            mem_handle=h.mem_handle,
            storage_size_bytes=h.storage_size_bytes,
            storage_offset_bytes=h.storage_offset_bytes,
            ref_counter_handle=h.ref_counter_handle,
            ref_counter_offset=h.ref_counter_offset,
            event_handle=h.event_handle,
            event_sync_required=h.event_sync_required,
        ),
    )


@pytest.fixture
def gpu_mem():
    with CudaMemory(discover_gpus()[0].uuid) as memory:
        yield memory


@pytest.mark.cuda
@requires_cuda
def test_create_shares_a_zeroed_block_of_its_own(gpu_mem):
    gpu_mem.create(info(1))
    h = gpu_mem.handle(1)
    assert isinstance(h, CudaHandle)
    assert len(h.mem_handle) == 66 and h.mem_handle[1:2] == b"c"
    assert (h.storage_offset_bytes, h.storage_size_bytes) == (0, SEGMENT)
    assert h.event_sync_required is False and h.event_handle == bytes(64)
    assert h.device_uuid == gpu_mem.device_uuid
    assert read_segment(gpu_mem, 1) == bytes(SEGMENT)
    with pytest.raises(ValueError, match="multiple of"):
        gpu_mem.create(info(2, 2 * MiB))
    with pytest.raises(ValueError, match="already exists"):
        gpu_mem.create(info(1))


@pytest.mark.cuda
@requires_cuda
def test_copy_with_overlaps_matches_memmove(gpu_mem):
    gpu_mem.create(info(1))
    gpu_mem.create(info(2))
    rng = random.Random(7)
    model = {1: bytearray(rng.randbytes(SEGMENT)), 2: bytearray(rng.randbytes(SEGMENT))}
    for sid, data in model.items():
        write_segment(gpu_mem, sid, 0, data)
    moves = [
        Move("near-down", Extent(1, 4096 + 64, 5 * MiB), Extent(1, 64, 5 * MiB)),  # staged
        Move("near-up", Extent(1, 100, 3 * MiB), Extent(1, 300, 3 * MiB)),  # staged, backward
        Move("far-down", Extent(2, 6 * MiB, 9 * MiB), Extent(2, 3 * MiB, 9 * MiB)),  # direct chunks
        Move("across", Extent(2, 0, 4 * MiB), Extent(1, 11 * MiB, 4 * MiB)),
    ]
    gpu_mem.copy(moves)
    for m in moves:
        chunk = bytes(model[m.source.segment_id][m.source.offset : m.source.end])
        model[m.destination.segment_id][m.destination.offset : m.destination.end] = chunk
    assert read_segment(gpu_mem, 1) == model[1]
    assert read_segment(gpu_mem, 2) == model[2]


@pytest.mark.cuda
@requires_cuda
def test_another_process_maps_zero_copy_both_ways(gpu_mem, map_in_child):
    gpu_mem.create(info(1))
    write_segment(gpu_mem, 1, MiB, b"written by the broker")
    child = map_in_child(wire_handle(gpu_mem, 1, MiB, 4096).SerializeToString())
    assert child.read(0, 21) == b"written by the broker"
    write_segment(gpu_mem, 1, MiB + 100, b"after the child mapped")
    assert child.read(100, 22) == b"after the child mapped"
    child.write(2000, b"written by the client")
    assert read_segment(gpu_mem, 1, MiB + 2000, 21) == b"written by the client"


@pytest.mark.cuda
@requires_cuda
def test_free_gives_the_memory_back_even_after_clients_mapped(gpu_mem, map_in_child):
    index = gpu_mem.index
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_reserved(index)
    gpu_mem.create(info(1))
    gpu_mem.create(info(2))
    assert torch.cuda.memory_reserved(index) == baseline + 2 * SEGMENT
    for _ in range(2):  # two clients decrement torch's IPC ref counter twice
        map_in_child(wire_handle(gpu_mem, 1, 0, 4096).SerializeToString()).close()
    gpu_mem.free(1)
    gpu_mem.free(2)  # never mapped by anyone
    gpu_mem.free(2)
    assert torch.cuda.memory_reserved(index) == baseline


@pytest.mark.cuda
@requires_cuda
def test_out_of_memory_is_resource_exhausted(gpu_mem):
    total = torch.cuda.get_device_properties(gpu_mem.index).total_memory
    too_big = (total // (2 * MiB) + 1) * 2 * MiB
    with pytest.raises(ResourceExhausted) as err:
        gpu_mem.create(info(1, too_big))
    assert err.value.satisfiable is False
    assert gpu_mem.segment_ids() == []


@pytest.mark.cuda
@requires_cuda
def test_mapper_refuses_same_process_and_invisible_gpus(gpu_mem):
    from kvbroker_client.mapping import DeviceNotVisibleError, SegmentMapper, UnsupportedHandleError

    gpu_mem.create(info(1))
    handle = wire_handle(gpu_mem, 1, 0, 4096)
    with pytest.raises(UnsupportedHandleError, match="this very process"):
        SegmentMapper().view(handle)
    handle.server_pid = os.getpid() + 1
    handle.cuda.device_uuid = "GPU-00000000-0000-0000-0000-000000000000"
    with pytest.raises(DeviceNotVisibleError):
        SegmentMapper().view(handle)


@pytest.mark.cuda
@requires_cuda
def test_a_daemon_on_expandable_segments_shares_nothing():
    script = (
        "from kvbroker.core.types import SegmentInfo\n"
        "from kvbroker.memory.cuda import CudaMemory, discover_gpus\n"
        "mem = CudaMemory(discover_gpus()[0].uuid)\n"
        "try:\n"
        "    mem.create(SegmentInfo(1, 1, 'p', 'gpu', 32 * 1024 * 1024))\n"
        "except RuntimeError as err:\n"
        "    print('refused:', err)\n"
        "assert mem.segment_ids() == []\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout, done.stdout


def test_reference_counter_layout_constant():
    # The reset in free() writes at header + 8 * slot; the GPU test above proves it.
    assert REF_COUNTER_HEADER_BYTES == 64


def test_importing_the_cuda_package_does_not_import_torch():
    script = (
        "import sys\n"
        "import kvbroker.memory.cuda as cuda\n"
        "from kvbroker.memory.cuda import CudaMemory, discover_gpus, configure_cuda_allocator_env\n"
        "from kvbroker.memory.cuda import CUDA_MIN_SEGMENT_BYTES, CUDA_SEGMENT_ALIGNMENT_BYTES, GpuInfo\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.cuda
@requires_cuda
def test_zero_clears_exactly_the_range(gpu_mem):
    gpu_mem.create(info(1))
    write_segment(gpu_mem, 1, 0, b"\xab" * (4 * MiB))
    gpu_mem.zero(1, MiB + 3, 2 * MiB)
    data = read_segment(gpu_mem, 1, 0, 4 * MiB)
    assert data == b"\xab" * (MiB + 3) + bytes(2 * MiB) + b"\xab" * (MiB - 3)
    with pytest.raises(ValueError, match="outside segment"):
        gpu_mem.zero(1, SEGMENT - 1, 2)
    with pytest.raises(KeyError):
        gpu_mem.zero(9, 0, 1)


class FailingCopy(CudaMemory):
    """Fails its k-th device copy after scribbling over the destination."""

    fail_at = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def _copy_range(self, destination, source):
        self.calls += 1
        if self.calls == self.fail_at:
            destination.fill_(0xEE)
            raise RuntimeError("injected device copy failure")
        super()._copy_range(destination, source)


@pytest.mark.cuda
@requires_cuda
def test_a_staged_move_that_fails_midway_is_restored_and_staging_is_returned():
    with FailingCopy(discover_gpus()[0].uuid) as mem:
        mem.create(info(1, 200 * MiB))
        index = mem.index
        rng = random.Random(9)
        data = rng.randbytes(200 * MiB)
        write_segment(mem, 1, 0, data)
        reserved = torch.cuda.memory_reserved(index)
        first = Move("first", Extent(1, 0, MiB), Extent(1, 199 * MiB, MiB))
        slide = Move("slide", Extent(1, 4096 + MiB, 150 * MiB), Extent(1, MiB, 150 * MiB))  # staged, 3 chunks
        mem.fail_at = 1 + 4  # the second chunk's stage-out (after `first`'s one call)
        with pytest.raises(CopyError) as caught:
            mem.copy([first, slide])
        assert caught.value.completed == 1 and caught.value.source_intact
        after = read_segment(mem, 1)
        assert after[4096 + MiB : 4096 + 151 * MiB] == data[4096 + MiB : 4096 + 151 * MiB]
        assert after[199 * MiB :] == data[:MiB]
        assert torch.cuda.memory_reserved(index) == reserved  # the staging buffer went back
