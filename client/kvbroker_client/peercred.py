"""The client's half of the peer-credential handshake (see the daemon's
``kvbroker/security/peercred.py``): connect to ``<unix_socket>.peer``, read one token line.

The token goes into the ``kvbroker-peer-token`` metadata of every call, so a broker that
authorizes by Unix uid knows who is calling. Brokers without the handshake socket (or a
TCP target) simply get no token: the call then carries whatever other credentials the
client has. Cost: one connection per client, at its first call.
"""

from __future__ import annotations

import socket

from kvbroker.wire import PEER_SOCKET_SUFFIX

MAX_TOKEN_BYTES = 256


def unix_path(target: str) -> str | None:
    """The socket path of a ``unix:`` target (``unix:///tmp/x.sock``, ``unix:/tmp/x``),
    or None for any other target."""
    if target.startswith("unix://"):
        return target[len("unix://"):]
    if target.startswith("unix:"):
        return target[len("unix:"):]
    return None


def fetch_peer_token(target: str, *, timeout_s: float = 2.0) -> str | None:
    """A peer token from the broker's handshake socket, or None when there is none (a
    TCP target, an older broker, or a socket this process may not open)."""
    path = unix_path(target)
    if path is None:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path + PEER_SOCKET_SUFFIX)
            data = b""
            while not data.endswith(b"\n") and len(data) <= MAX_TOKEN_BYTES:
                chunk = sock.recv(MAX_TOKEN_BYTES)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    token = data.strip().decode("ascii", "replace")
    return token or None
