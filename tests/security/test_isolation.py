"""Every attack of issue 9's "identity, authorization" list, tried against a real daemon
with principals configured, refused with the right status code.

Tried before this change as another principal or another process: listing every
tenant's caches, attaching another pool's cache and reading it, force-releasing another
session's cache, sending another session's id to unpin and release its cache, opening a
Watch with a lease-only session's id and closing it to free its caches.
"""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker.wire import AUTHORIZATION_KEY, PEER_TOKEN_KEY, SESSION_ID_KEY, SESSION_SECRET_KEY
from tests.support.daemon import ROOT, daemon_fixture

MiB = 1 << 20
Code = grpc.StatusCode
TOKENS = {"vista": "vista-token", "vista2": "vista2-token", "ocr": "ocr-token", "ops": "ops-token"}

CONFIG = """
[devices]
host_capacity = "64MiB"

[[pools]]
name = "vista"
block_bytes = "1MiB"
segment_bytes = "8MiB"

[[pools]]
name = "ocr"
block_bytes = "1MiB"
segment_bytes = "8MiB"

[[auth.principals]]
name = "vista"
token_env = "T_VISTA"
pools = { vista = ["allocate", "attach", "release"] }

[[auth.principals]]
name = "vista2"
token_env = "T_VISTA2"
pools = { vista = ["allocate", "attach", "release"] }

[[auth.principals]]
name = "ocr"
token_env = "T_OCR"
pools = { ocr = ["allocate", "attach", "release"] }

[[auth.principals]]
name = "ops"
token_env = "T_OPS"
operator = true

[[auth.principals]]
name = "reader"
uids = [65534]
pools = { ocr = ["attach"] }
"""

daemon = daemon_fixture(
    config=CONFIG, scope="module",
    env={"T_VISTA": TOKENS["vista"], "T_VISTA2": TOKENS["vista2"], "T_OCR": TOKENS["ocr"], "T_OPS": TOKENS["ops"]},
)  # fmt: skip


class As:
    """Calls as one principal (its bearer token), optionally for one session, whose
    secret it learns from the first call's initial metadata, as the client stub does."""

    def __init__(self, daemon, principal: str | None, session: str = "", secret: str | None = None) -> None:
        self.channel = grpc.insecure_channel(daemon.target)
        self.stub = broker_pb2_grpc.CacheBrokerStub(self.channel)
        self.principal, self.session, self.secret = principal, session, secret

    def metadata(self) -> list[tuple[str, str]]:
        md = [(AUTHORIZATION_KEY, f"Bearer {TOKENS[self.principal]}")] if self.principal else []
        if self.session:
            md.append((SESSION_ID_KEY, self.session))
            if self.secret is not None:
                md.append((SESSION_SECRET_KEY, self.secret))
        return md

    def __call__(self, method: str, request):
        response, call = getattr(self.stub, method).with_call(request, metadata=self.metadata(), timeout=10)
        for key, value in call.initial_metadata() or ():
            if key == SESSION_SECRET_KEY and self.secret is None:
                self.secret = value
        return response

    def refused(self, method: str, request) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            self(method, request)
        return info.value.code(), info.value.details()


def allocate(who: As, pool: str, **fields) -> pb.Cache:
    return who("Allocate", pb.AllocateRequest(pool=pool, size_bytes=MiB, **fields)).cache


def test_calls_without_good_credentials_are_unauthenticated(daemon):
    assert As(daemon, None).refused("Stats", pb.StatsRequest())[0] is Code.UNAUTHENTICATED
    with grpc.insecure_channel(daemon.target) as channel:
        stub = broker_pb2_grpc.CacheBrokerStub(channel)
        for header in ("Bearer wrong", "Basic dmlzdGE=", "vista-token"):
            with pytest.raises(grpc.RpcError) as info:
                stub.Stats(pb.StatsRequest(), metadata=[(AUTHORIZATION_KEY, header)])
            assert info.value.code() is Code.UNAUTHENTICATED
            assert "vista-token" not in info.value.details()
    assert "vista-token" not in daemon.log()


def test_a_principal_allocates_only_in_its_pools(daemon):
    vista = As(daemon, "vista")
    code, details = vista.refused("Allocate", pb.AllocateRequest(pool="ocr", size_bytes=MiB))
    assert code is Code.PERMISSION_DENIED and "may not allocate on pool 'ocr'" in details
    cache = allocate(vista, "vista")
    vista("Release", pb.ReleaseRequest(cache_id=cache.cache_id))


def test_listing_shows_a_tenant_only_its_own_pools(daemon):
    ocr, vista, ops = As(daemon, "ocr"), As(daemon, "vista"), As(daemon, "ops")
    theirs = allocate(ocr, "ocr", retain=True)
    mine = allocate(vista, "vista", retain=True)
    try:
        listed = {c.cache_id for c in vista("ListCaches", pb.ListCachesRequest()).caches}
        assert mine.cache_id in listed and theirs.cache_id not in listed
        assert vista.refused("ListCaches", pb.ListCachesRequest(pool="ocr"))[0] is Code.PERMISSION_DENIED
        everything = {c.cache_id for c in ops("ListCaches", pb.ListCachesRequest()).caches}
        assert {mine.cache_id, theirs.cache_id} <= everything
    finally:
        ocr("Release", pb.ReleaseRequest(cache_id=theirs.cache_id, force=True))
        vista("Release", pb.ReleaseRequest(cache_id=mine.cache_id, force=True))


def test_another_pools_cache_cannot_be_attached_pinned_or_released(daemon):
    ocr, vista = As(daemon, "ocr", "ocr-worker"), As(daemon, "vista")
    theirs = allocate(ocr, "ocr")
    for method, request in (
        ("Attach", pb.AttachRequest(cache_id=theirs.cache_id)),
        ("Pin", pb.PinRequest(cache_id=theirs.cache_id)),
        ("Release", pb.ReleaseRequest(cache_id=theirs.cache_id, force=True)),
    ):
        assert vista.refused(method, request)[0] is Code.PERMISSION_DENIED, method
    assert ocr("Attach", pb.AttachRequest(cache_id=theirs.cache_id)).cache.holder_count == 1
    ocr("Release", pb.ReleaseRequest(cache_id=theirs.cache_id))


def test_force_releasing_a_cache_another_holder_holds_needs_operator_rights(daemon):
    a, b, ops = As(daemon, "vista", "vista-a"), As(daemon, "vista2", "vista-b"), As(daemon, "ops")
    cache = allocate(a, "vista")
    b("Attach", pb.AttachRequest(cache_id=cache.cache_id))
    code, details = b.refused("Release", pb.ReleaseRequest(cache_id=cache.cache_id, force=True))
    assert code is Code.PERMISSION_DENIED and "force_release" in details
    assert ops("Release", pb.ReleaseRequest(cache_id=cache.cache_id, force=True)).freed


def test_another_sessions_id_grants_nothing(daemon):
    owner = As(daemon, "vista", "victim-session")
    cache = allocate(owner, "vista", pinned=True)
    assert owner.secret, "the broker issued the session a secret"
    same_principal = As(daemon, "vista", "victim-session")  # the id, no secret
    guessing = As(daemon, "vista", "victim-session", secret="guess")
    other_principal = As(daemon, "vista2", "victim-session", secret=owner.secret)
    for intruder in (same_principal, guessing, other_principal):
        for method, request in (
            ("Unpin", pb.UnpinRequest(cache_id=cache.cache_id)),
            ("Release", pb.ReleaseRequest(cache_id=cache.cache_id)),
            ("Heartbeat", pb.HeartbeatRequest()),
        ):
            assert intruder.refused(method, request)[0] is Code.UNAUTHENTICATED, method
    # Nothing happened to the victim's cache: still held and pinned by its session.
    info = owner("Attach", pb.AttachRequest(cache_id=cache.cache_id)).cache
    assert info.pinned and info.holder_count == 1
    owner("Unpin", pb.UnpinRequest(cache_id=cache.cache_id))
    assert owner("Release", pb.ReleaseRequest(cache_id=cache.cache_id)).freed


def test_a_lease_only_sessions_id_cannot_open_its_watch(daemon):
    owner = As(daemon, "vista", "lease-only-victim")
    cache = allocate(owner, "vista")
    thief = As(daemon, "vista", "lease-only-victim")
    stream = thief.stub.Watch(pb.WatchRequest(), metadata=thief.metadata(), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() is Code.UNAUTHENTICATED
    # Closing that stream ended nothing: the cache is still the owner's.
    assert owner("Attach", pb.AttachRequest(cache_id=cache.cache_id)).cache.holder_count == 1
    owner("Release", pb.ReleaseRequest(cache_id=cache.cache_id))


def test_a_watch_returns_the_secret_and_later_calls_need_it(daemon):
    watcher = As(daemon, "vista", "watching-session")
    stream = watcher.stub.Watch(pb.WatchRequest(), metadata=watcher.metadata(), timeout=30)
    opened = next(stream)
    assert opened.kind == pb.EVENT_KIND_SESSION_OPENED and len(opened.session_secret) >= 32
    assert As(daemon, "vista", "watching-session").refused("Heartbeat", pb.HeartbeatRequest())[0] is Code.UNAUTHENTICATED
    watcher.secret = opened.session_secret
    assert watcher("Heartbeat", pb.HeartbeatRequest()).lease_seconds > 0
    stream.cancel()


def test_defragment_needs_operator_rights(daemon):
    assert As(daemon, "vista").refused("Defragment", pb.DefragmentRequest(dry_run=True))[0] is Code.PERMISSION_DENIED
    As(daemon, "ops")("Defragment", pb.DefragmentRequest(dry_run=True))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another uid")
def test_a_unix_peer_is_its_uid(daemon):
    """A process of uid 65534 (principal "reader": attach on ocr) proves its uid through
    the handshake socket; the same calls without the peer token are refused."""
    ocr = As(daemon, "ocr")
    cache = allocate(ocr, "ocr", retain=True)
    sock_dir = os.path.dirname(daemon.unix_socket)
    os.chmod(sock_dir, 0o755)
    for path in (daemon.unix_socket, daemon.unix_socket + ".peer"):
        os.chmod(path, 0o666)
    script = """
import sys
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/client"]
import os, grpc
from kvbroker_client.peercred import fetch_peer_token
from kvbroker.v1 import broker_pb2 as pb, broker_pb2_grpc
target, cache_id = sys.argv[1], sys.argv[2]
# The channel before the uid changes: grpc imports modules as it is first used, and the
# checkout may not be readable by uid 65534 (a clone under a 0700 mktemp directory). It
# connects at the first call, so the broker still sees uid 65534.
stub = broker_pb2_grpc.CacheBrokerStub(grpc.insecure_channel(target))
os.setgid(65534); os.setuid(65534)
def code(call, **kw):
    try:
        call(timeout=10, **kw)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name
token = fetch_peer_token(target)
md = [("%s", token)] if token else []
print(code(lambda **kw: stub.Attach(pb.AttachRequest(cache_id=cache_id), **kw), metadata=md),
      code(lambda **kw: stub.Allocate(pb.AllocateRequest(pool="ocr", size_bytes=1 << 20), **kw), metadata=md),
      code(lambda **kw: stub.Attach(pb.AttachRequest(cache_id=cache_id), **kw)))
""" % PEER_TOKEN_KEY
    done = subprocess.run(
        [sys.executable, "-c", script, daemon.target, cache.cache_id, str(ROOT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OK", "PERMISSION_DENIED", "UNAUTHENTICATED"]
    # The reader's sessionless hold ("~reader") now counts: only an operator frees it.
    assert ocr.refused("Release", pb.ReleaseRequest(cache_id=cache.cache_id, force=True))[0] is Code.PERMISSION_DENIED
    As(daemon, "ops")("Release", pb.ReleaseRequest(cache_id=cache.cache_id, force=True))
