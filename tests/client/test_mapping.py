"""The mapper and the dtype table, on real shm objects: a host handle names its directory
(``HostSegmentHandle.shm_dir``, issue 10.1: a daemon run with ``--shm-dir`` broke every
host client), the directory is checked, the inode is still verified, and the torch dtypes
come from ``kvbroker.wire.DTYPES``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from kvbroker import wire
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import InvalidRequest
from kvbroker_client.dtypes import to_proto_dtype, to_torch_dtype, torch_dtype_of, torch_dtypes, wire_dtype
from kvbroker_client.mapping import HandleError, SegmentMapper, StaleHandleError

SIZE = 1 << 16


def shm_object(directory: Path) -> pb.HostSegmentHandle:
    """A segment object as the daemon creates one: a sized file named kvb-..., under
    ``directory``."""
    name = f"kvb-mappingtest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(directory / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, SIZE)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return pb.HostSegmentHandle(
        shm_name=name, size_bytes=SIZE, st_dev=st.st_dev, st_ino=st.st_ino, shm_dir=str(directory)
    )


def handle_of(host: pb.HostSegmentHandle, offset: int = 0, nbytes: int = 64) -> pb.Handle:
    handle = pb.Handle(instance_id=f"i-{host.shm_name}", segment_id=1, segment_generation=1,
                       byte_offset=offset, nbytes=nbytes)  # fmt: skip
    handle.host.CopyFrom(host)
    return handle


@pytest.fixture
def shm_dir(tmp_path) -> Path:
    """A private directory on the shm tmpfs when there is one (as ``--shm-dir`` would
    name), else a temporary directory: the mapper maps whatever regular file it names."""
    base = Path("/dev/shm")
    if base.is_dir() and os.access(base, os.W_OK):
        directory = base / f"clienttest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        yield directory
        for entry in directory.iterdir():
            entry.unlink()
        directory.rmdir()
    else:
        yield tmp_path


def test_a_host_handle_maps_the_object_in_its_own_directory(shm_dir) -> None:
    host = shm_object(shm_dir)
    view = SegmentMapper().view(handle_of(host, offset=128, nbytes=16), torch.int32, (4,))
    view.copy_(torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    with open(shm_dir / host.shm_name, "rb") as f:
        f.seek(128)
        assert torch.frombuffer(bytearray(f.read(16)), dtype=torch.int32).tolist() == [1, 2, 3, 4]


def test_an_empty_shm_dir_means_the_mappers_default(shm_dir) -> None:
    host = shm_object(shm_dir)
    host.shm_dir = ""
    assert SegmentMapper(shm_dir=str(shm_dir)).view(handle_of(host)).numel() == 64
    with pytest.raises(StaleHandleError, match="does not exist"):
        SegmentMapper(shm_dir=str(shm_dir / "elsewhere")).view(handle_of(host))


@pytest.mark.parametrize("bad", ["relative/dir", "/dev/shm/../etc", "..", "/tmp/x/..", "/tmp/\0x"])
def test_a_shm_dir_must_be_absolute_without_dotdot(shm_dir, bad) -> None:
    host = shm_object(shm_dir)
    host.shm_dir = bad
    with pytest.raises(HandleError, match="absolute path without"):
        SegmentMapper().view(handle_of(host))


def test_the_inode_and_the_name_are_still_checked(shm_dir) -> None:
    host = shm_object(shm_dir)
    wrong_inode = pb.HostSegmentHandle()
    wrong_inode.CopyFrom(host)
    wrong_inode.st_ino += 1
    with pytest.raises(StaleHandleError, match="another object"):
        SegmentMapper().view(handle_of(wrong_inode))
    bad_name = pb.HostSegmentHandle()
    bad_name.CopyFrom(host)
    bad_name.shm_name = "../" + host.shm_name
    with pytest.raises(HandleError, match="does not match"):
        SegmentMapper().view(handle_of(bad_name))
    link = shm_dir / f"kvb-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(shm_dir / host.shm_name)
    linked = pb.HostSegmentHandle()
    linked.CopyFrom(host)
    linked.shm_name = link.name
    with pytest.raises(HandleError, match="cannot open"):
        SegmentMapper().view(handle_of(linked))  # O_NOFOLLOW


def test_the_same_segment_named_in_another_directory_is_other_memory(shm_dir, tmp_path) -> None:
    host = shm_object(shm_dir)
    mapper = SegmentMapper()
    mapper.view(handle_of(host))
    moved = pb.HostSegmentHandle()
    moved.CopyFrom(host)
    moved.shm_dir = str(tmp_path)
    with pytest.raises(StaleHandleError, match="other memory"):
        mapper.view(handle_of(moved))


def test_the_torch_table_is_the_wire_table() -> None:
    table = torch_dtypes()
    assert set(table) == set(pb.Dtype.values()) - {pb.DTYPE_UNSPECIFIED}
    for entry in wire.DTYPES:
        dtype = table[entry.value]
        assert str(dtype) == f"torch.{entry.name}" and dtype.itemsize == entry.itemsize
        assert to_proto_dtype(dtype) == to_proto_dtype(entry.name) == entry.value
        assert to_torch_dtype(f"torch.{entry.name}") is dtype and torch_dtype_of(entry.value) is dtype
    assert wire_dtype("half").name == "float16", "torch aliases resolve"
    assert torch_dtype_of(pb.DTYPE_UNSPECIFIED) is None and torch_dtype_of(999) is None
    for bad in ("float17", torch.complex64, 3, "float16; rm"):
        with pytest.raises(InvalidRequest, match="^dtype: "):
            to_proto_dtype(bad)
