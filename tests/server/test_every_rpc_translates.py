"""Every unary RPC of the servicer answers domain errors through the one status table
(``kvbroker.server.convert``): a merge once dropped EndSessions' decorator, and its
InvalidArgument reached the client as UNKNOWN "Unexpected <class ...>"."""

from __future__ import annotations

from kvbroker.server.servicer import CacheBrokerServicer
from kvbroker.v1 import broker_pb2 as pb

#: Streaming: Watch maps its refusals itself (the session gate runs before the stream).
STREAMING = {"Watch"}


def test_every_unary_rpc_is_wrapped_in_the_error_translation():
    methods = pb.DESCRIPTOR.services_by_name["CacheBroker"].methods
    unwrapped = [
        m.name for m in methods
        if m.name not in STREAMING and not hasattr(getattr(CacheBrokerServicer, m.name), "__wrapped__")
    ]  # fmt: skip
    assert unwrapped == []
    assert len(methods) > 20  # the paged, checkpoint and session RPCs are all there
