"""The wire constants agree with the generated protobuf code."""

from kvbroker import wire
from kvbroker.v1 import broker_pb2 as pb


def test_dtype_table_matches_the_proto_enum():
    names = {v.number: v.name for v in pb.Dtype.DESCRIPTOR.values}
    assert {d.value for d in wire.DTYPES} == set(names) - {0}
    for dtype in wire.DTYPES:
        assert names[dtype.value] == "DTYPE_" + dtype.name.upper()


def test_session_end_reasons_are_label_values():
    assert all(r.value.isidentifier() for r in wire.SessionEndReason)


def test_shm_names_are_bounded_and_plain():
    assert wire.SHM_NAME_PATTERN.fullmatch("kvb-12-abc-1-1")
    assert not wire.SHM_NAME_PATTERN.fullmatch("kvb-../etc")
    assert not wire.SHM_NAME_PATTERN.fullmatch("kvb-" + "a" * 201)
