"""TLS and mutual TLS on the TCP listener (real daemon, certificates made by trustme),
and the refusal to serve a non-loopback address with authorization off."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import trustme

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from tests.support.daemon import ROOT, child_env, running_daemon

MiB = 1 << 20

CONFIG = """
[devices]
host_capacity = "16MiB"

[[auth.principals]]
name = "ops"
tls_names = ["ops.example"]
operator = true
pools = { "*" = ["allocate", "attach", "release"] }
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost, and two client certificates
    (one that names a principal, one that names nobody), as PEM files."""
    ca = trustme.CA()
    out = tmp_path_factory.mktemp("pki")
    files = {"ca": out / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, identities in (("server", ("127.0.0.1", "localhost")), ("ops", ("ops.example",)), ("stranger", ("x.example",))):
        cert = ca.issue_cert(*identities)
        files[name] = out / f"{name}.pem"
        files[name + "-key"] = out / f"{name}-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(files[name]))
        cert.private_key_pem.write_to_path(str(files[name + "-key"]))
    return {k: str(v) for k, v in files.items()}


def _channel(address: str, pki, client: str | None) -> grpc.Channel:
    read = lambda key: open(pki[key], "rb").read()  # noqa: E731
    creds = grpc.ssl_channel_credentials(
        root_certificates=read("ca"),
        private_key=read(client + "-key") if client else None,
        certificate_chain=read(client) if client else None,
    )
    return grpc.secure_channel(address, creds)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_mutual_tls_names_the_principal_and_refuses_strangers(tmp_path, pki):
    args = ("--tls-cert", pki["server"], "--tls-key", pki["server-key"], "--tls-client-ca", pki["ca"])
    with running_daemon(tmp_path, *args, config=CONFIG) as daemon:
        assert "tcp+mtls 127.0.0.1:" in daemon.log()
        with _channel(daemon.address, pki, "ops") as channel:
            stub = broker_pb2_grpc.CacheBrokerStub(channel)
            cache = stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=MiB), timeout=10).cache
            assert stub.Release(pb.ReleaseRequest(cache_id=cache.cache_id), timeout=10).freed
            assert _code(lambda: stub.Defragment(pb.DefragmentRequest(dry_run=True), timeout=10)) is grpc.StatusCode.OK
        with _channel(daemon.address, pki, "stranger") as channel:
            stub = broker_pb2_grpc.CacheBrokerStub(channel)
            assert _code(lambda: stub.Stats(pb.StatsRequest(), timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        with _channel(daemon.address, pki, None) as channel:  # no client certificate
            stub = broker_pb2_grpc.CacheBrokerStub(channel)
            assert _code(lambda: stub.Stats(pb.StatsRequest(), timeout=10)) is grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(daemon.address) as channel:  # plaintext to a TLS port
            stub = broker_pb2_grpc.CacheBrokerStub(channel)
            assert _code(lambda: stub.Stats(pb.StatsRequest(), timeout=10)) is grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_certificates(tmp_path, pki):
    args = ("--tls-cert", pki["server"], "--tls-key", pki["server-key"])
    with running_daemon(tmp_path, *args) as daemon:  # authorization off, loopback only
        assert "tcp+tls 127.0.0.1:" in daemon.log()
        with _channel(daemon.address, pki, None) as channel:
            stub = broker_pb2_grpc.CacheBrokerStub(channel)
            assert stub.Stats(pb.StatsRequest(), timeout=10).total_capacity_bytes > 0


def _serve(*args: str) -> subprocess.CompletedProcess:
    """Run ``kvbroker serve`` expecting it to refuse to start (a bounded wait)."""
    return subprocess.run(
        [sys.executable, "-m", "kvbroker", "serve", "--devices", "host", "--unix-socket", "",
         "--metrics-listen", "", *args],
        cwd=ROOT, env=child_env(None), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_non_loopback_listener_without_authorization_is_refused():
    done = _serve("--listen", "0.0.0.0:0")
    assert done.returncode == 2
    assert "--listen: 0.0.0.0:0 is reachable from other hosts and authorization is off" in done.stderr


def test_the_refusal_can_be_overridden_for_a_trusted_network(tmp_path):
    with running_daemon(tmp_path, "--listen", "0.0.0.0:0", "--allow-unauthenticated-listen") as daemon:
        assert "authorization is off" in daemon.log()
