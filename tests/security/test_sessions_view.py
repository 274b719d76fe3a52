"""Operators see who is connected: each session's principal, what the client says of
itself, what the kernel says (peer uid and pid, through the handshake socket), its lease
and what it holds; a principal without the list right sees its own sessions only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker.wire import AUTHORIZATION_KEY
from kvbroker_client import BrokerClient
from tests.support.daemon import ROOT, child_env, daemon_fixture, running_daemon
from tests.support.wait import wait_until

MiB = 1 << 20

daemon = daemon_fixture(scope="module", host_capacity="64MiB")


def test_a_worker_session_shows_its_peer_holds_and_pins(daemon):
    with BrokerClient(daemon.target) as worker:
        cache = worker.allocate(size_bytes=MiB, pinned=True)
        worker.allocate(size_bytes=MiB)
        cache.tensor()  # maps the segment
        with BrokerClient(daemon.target, session_id="") as operator:
            mine = wait_until(
                lambda: [s for s in operator.sessions().sessions if s.session_id == worker.session_id],
                10, "the worker's session listed",
            )[0]
        assert mine.principal == "anonymous" and mine.watching
        assert mine.peer_known and (mine.peer_uid, mine.peer_pid) == (os.getuid(), os.getpid())
        assert (mine.holds, mine.pins, mine.mapped_segments) == (2, 1, 1)
        assert 0 < mine.lease_remaining_seconds <= 10 and mine.age_seconds >= 0
        done = subprocess.run(
            [sys.executable, "-m", "kvbroker", "--target", daemon.target, "sessions"],
            cwd=ROOT, env=child_env(None), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        row = next(line for line in done.stdout.splitlines() if line.startswith(worker.session_id))
        assert f"uid {os.getuid()} pid {os.getpid()}" in row and "watch" in row
        as_json = subprocess.run(
            [sys.executable, "-m", "kvbroker", "--target", daemon.target, "sessions", "--json"],
            cwd=ROOT, env=child_env(None), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        ids = [s["session_id"] for s in json.loads(as_json.stdout)["sessions"]]
        assert worker.session_id in ids


CONFIG = """
[[auth.principals]]
name = "a"
token_env = "T_A"
pools = { default = ["allocate", "attach", "release"] }

[[auth.principals]]
name = "b"
token_env = "T_B"
pools = { default = ["allocate", "attach", "release"] }
"""


def test_a_principal_without_the_list_right_sees_its_own_sessions_only(tmp_path):
    with running_daemon(tmp_path, config=CONFIG, env={"T_A": "ta", "T_B": "tb"}) as d:
        with BrokerClient(d.target, token="ta") as a, BrokerClient(d.target, token="tb") as b:
            a.allocate(size_bytes=MiB)
            seen_by_a = {s.session_id for s in a.sessions().sessions}
            seen_by_b = {s.session_id for s in b.sessions().sessions}
            assert a.session_id in seen_by_a and b.session_id not in seen_by_a
            assert b.session_id in seen_by_b and a.session_id not in seen_by_b
            with grpc.insecure_channel(d.target) as channel:
                stub = broker_pb2_grpc.CacheBrokerStub(channel)
                listed = stub.Sessions(pb.SessionsRequest(), metadata=[(AUTHORIZATION_KEY, "Bearer ta")], timeout=10)
            assert {s.principal for s in listed.sessions} == {"a"}
