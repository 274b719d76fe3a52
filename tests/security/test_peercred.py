"""The peer-credential handshake: real Unix sockets, a real process of another uid."""

import asyncio
import os
import pathlib
import shutil
import tempfile
import subprocess
import sys

import pytest

from kvbroker.security import PeerHandshakeServer, PeerRegistry
from kvbroker_client.peercred import fetch_peer_token, unix_path


def test_unix_path_of_targets():
    assert unix_path("unix:///tmp/k.sock") == "/tmp/k.sock"
    assert unix_path("unix:/tmp/k.sock") == "/tmp/k.sock"
    assert unix_path("127.0.0.1:50051") is None


def test_registry_expires_and_bounds_tokens():
    registry = PeerRegistry(ttl_seconds=0.0, max_tokens=2)
    from kvbroker.security import PeerIdentity

    ident = PeerIdentity(1, 2, 3)
    tokens = [registry.issue(ident) for _ in range(3)]
    assert len(registry) == 2
    assert registry.resolve(tokens[0]) is None  # evicted: the table is bounded
    assert registry.resolve("not-a-token") is None


def _serve_and_fetch(tmp_path, fetcher):
    """Start a handshake server on a socket, run ``fetcher(target)`` in a thread, and
    return (token, registry)."""
    sock = str(tmp_path / "broker.sock")
    registry = PeerRegistry()

    async def main():
        server = PeerHandshakeServer(sock + ".peer", registry, mode=0o666)
        await server.start()
        try:
            return await asyncio.to_thread(fetcher, "unix://" + sock)
        finally:
            await server.stop()

    return asyncio.run(main()), registry


def test_the_token_names_this_process(tmp_path):
    token, registry = _serve_and_fetch(tmp_path, fetch_peer_token)
    identity = registry.resolve(token)
    assert identity is not None
    assert (identity.pid, identity.uid, identity.gid) == (os.getpid(), os.getuid(), os.getgid())


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another uid")
def test_the_token_names_a_process_of_another_uid():
    # pytest's tmp_path sits under a 0700 directory; the other uid must reach the socket.
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="kvb-peer-"))
    os.chmod(tmp_path, 0o755)
    script = (
        # Import first: after setuid the interpreter's own files may be unreadable.
        "import os, sys; sys.path[:0] = sys.argv[2:];"
        "from kvbroker_client.peercred import fetch_peer_token;"
        "os.setgid(65534); os.setuid(65534);"
        "print(fetch_peer_token(sys.argv[1]), os.getpid())"
    )
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def fetch(target):
        out = subprocess.run(
            [sys.executable, "-c", script, target, here, os.path.join(here, "client")],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.split()
        return out

    try:
        (token, pid), registry = _serve_and_fetch(tmp_path, fetch)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    identity = registry.resolve(token)
    assert identity is not None and identity.uid == 65534 and identity.pid == int(pid)


def test_no_handshake_socket_means_no_token(tmp_path):
    assert fetch_peer_token("unix://" + str(tmp_path / "absent.sock")) is None
    assert fetch_peer_token("127.0.0.1:1") is None
