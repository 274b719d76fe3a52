"""The client stub and the CLI with credentials, against a real daemon with principals:
bearer tokens (argument, environment), mutual TLS, and the typed errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import trustme

from kvbroker_client import BrokerClient, NotAuthenticated, PermissionDenied
from tests.support.daemon import ROOT, child_env, running_daemon

MiB = 1 << 20

CONFIG = """
[devices]
host_capacity = "32MiB"

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
name = "ops"
token_env = "T_OPS"
tls_names = ["ops.example"]
operator = true
"""
ENV = {"T_VISTA": "vista-token", "T_OPS": "ops-token"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = trustme.CA()
    out = tmp_path_factory.mktemp("pki")
    paths = {"ca": str(out / "ca.pem")}
    ca.cert_pem.write_to_path(paths["ca"])
    for name, identity in (("server", "127.0.0.1"), ("ops", "ops.example")):
        cert = ca.issue_cert(identity)
        paths[name], paths[name + "-key"] = str(out / f"{name}.pem"), str(out / f"{name}-key.pem")
        cert.cert_chain_pems[0].write_to_path(paths[name])
        cert.private_key_pem.write_to_path(paths[name + "-key"])
    return paths


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, pki):
    args = ("--tls-cert", pki["server"], "--tls-key", pki["server-key"], "--tls-client-ca", pki["ca"])
    with running_daemon(tmp_path_factory.mktemp("d"), *args, config=CONFIG, env=ENV) as d:
        yield d


def test_a_worker_with_its_token_uses_its_pool_and_only_it(daemon):
    with BrokerClient(daemon.target, token="vista-token") as broker:
        cache = broker.allocate("vista", size_bytes=MiB)
        with cache.pinned() as view:
            view.fill_(7)
        assert cache.tensor(torch.uint8)[0].item() == 7
        with pytest.raises(PermissionDenied, match="may not allocate on pool 'ocr'"):
            broker.allocate("ocr", size_bytes=MiB)
        cache.release()


def test_a_client_without_credentials_is_told_so(daemon):
    with pytest.raises(NotAuthenticated):
        with BrokerClient(daemon.target, session_id="") as broker:
            broker.stats()


def test_the_token_comes_from_the_environment_too(daemon, monkeypatch):
    monkeypatch.setenv("KVBROKER_TOKEN", "vista-token")
    with BrokerClient(daemon.target) as broker:
        broker.release(broker.allocate("vista", size_bytes=MiB).cache_id)


def test_mutual_tls_client_and_cli(daemon, pki):
    with BrokerClient(daemon.address, session_id="", tls_ca=pki["ca"], tls_cert=pki["ops"], tls_key=pki["ops-key"]) as ops:
        assert ops.defragment(dry_run=True).dry_run
    cli = [
        sys.executable, "-m", "kvbroker", "--target", daemon.address, "--tls-ca", pki["ca"],
        "--tls-cert", pki["ops"], "--tls-key", pki["ops-key"], "stats", "--json",
    ]  # fmt: skip
    done = subprocess.run(cli, cwd=ROOT, env=child_env(None), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(json.loads(done.stdout)["total_capacity_bytes"]) > 0
    bare = subprocess.run(
        [sys.executable, "-m", "kvbroker", "--target", daemon.target, "ls"],
        cwd=ROOT, env=child_env(None), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bare.returncode == 1 and "credentials" in bare.stderr
    with_token = subprocess.run(
        [sys.executable, "-m", "kvbroker", "--target", daemon.target, "ls"],
        cwd=ROOT, env=child_env({"KVBROKER_TOKEN": "ops-token"}), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert with_token.returncode == 0, with_token.stderr
