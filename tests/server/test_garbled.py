"""Issue 9.6: request bytes that are not a valid message get INVALID_ARGUMENT, and the
daemon log gets at most one rate-limited line, never an ERROR with a traceback."""

from __future__ import annotations

import asyncio
import logging

import grpc

from kvbroker.server import registration
from kvbroker.v1 import broker_pb2 as pb
from tests.engine.support import private_shm_dir

from .support import expect, serving

#: Field 1, length-delimited, claiming 255 bytes that do not follow.
GARBLED = b"\x0a\xff\x01"


def test_garbled_requests_are_invalid_argument_for_every_method(caplog):
    async def main(shm_dir: str):
        async with serving(shm_dir) as s:
            for method in registration.SERVICE.methods:
                path = f"/{registration.SERVICE.full_name}/{method.name}"
                if method.server_streaming:
                    call = s.channel.unary_stream(path)(GARBLED)
                    details = await expect(grpc.StatusCode.INVALID_ARGUMENT, call.read())
                else:
                    details = await expect(grpc.StatusCode.INVALID_ARGUMENT, s.channel.unary_unary(path)(GARBLED))
                assert details == f"the request is not a valid kvbroker.v1.{method.input_type.name} message"
            reply = await s.stub.Stats(pb.StatsRequest())
            assert reply.instance_id == "test", "the server serves on"

    caplog.set_level(logging.INFO)
    with private_shm_dir() as shm_dir:
        asyncio.run(main(shm_dir))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    refused = [r for r in caplog.records if "is not a valid" in r.getMessage()]
    assert len(refused) <= 1, "rate-limited"


def test_the_refusal_log_is_rate_limited():
    now = [100.0]
    limited = registration._RateLimitedLog(60.0, clock=lambda: now[0])
    for _ in range(5):
        limited.warning("x %s", 1)
    assert limited.suppressed == 4
    now[0] += 61
    limited.warning("x %s", 1)
    assert limited.suppressed == 0
