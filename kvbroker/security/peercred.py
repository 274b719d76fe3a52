"""Unix peer credentials for gRPC callers, through a handshake socket beside the gRPC one.

gRPC does not tell a server the uid or pid of a caller on its Unix socket. The kernel
tells it to whoever accepts the connection (``SO_PEERCRED``), so the daemon listens on a
second Unix socket, ``<unix_socket>.peer`` (``wire.PEER_SOCKET_SUFFIX``), next to the gRPC
one and with the same mode: a client connects, the daemon reads the connection's
``SO_PEERCRED`` (pid, uid, gid, as the kernel recorded them at ``connect``), answers one
line holding a fresh random token and closes. The client then sends that token in the
``kvbroker-peer-token`` metadata (``wire.PEER_TOKEN_KEY``) of its gRPC calls, and the
daemon resolves it to the uid and pid it was issued to.

What this proves: the caller, or a process it gave the token to, could connect to the
socket as that uid. A process of another uid cannot forge it (tokens are 256-bit random
values), and a process of the same uid could read the first one's memory anyway, so the
token adds no power that the uid did not already have.

Cost: one extra connection per client process (the client fetches the token once and
keeps it); one dictionary look-up per call. Tokens live while used: one unused for
``ttl_seconds`` is forgotten, and the table is bounded (the oldest go first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What the kernel said about a peer when it connected to the handshake socket."""

    pid: int
    uid: int
    gid: int


class PeerRegistry:
    """Issued peer tokens and the identities they stand for (bounded, expiring)."""

    def __init__(self, *, ttl_seconds: float = 3600.0, max_tokens: int = 65536) -> None:
        self._ttl = ttl_seconds
        self._max = max_tokens
        self._tokens: OrderedDict[str, tuple[PeerIdentity, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tokens)

    def issue(self, identity: PeerIdentity) -> str:
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (identity, time.monotonic())
        while len(self._tokens) > self._max:
            self._tokens.popitem(last=False)
        return token

    def resolve(self, token: str) -> PeerIdentity | None:
        """The identity a token was issued to, or None (unknown or expired). A use
        renews the token."""
        entry = self._tokens.get(token)
        if entry is None:
            return None
        identity, last_used = entry
        now = time.monotonic()
        if now - last_used > self._ttl:
            del self._tokens[token]
            return None
        self._tokens[token] = (identity, now)
        self._tokens.move_to_end(token)
        return identity


def peer_identity(sock: socket.socket) -> PeerIdentity:
    """``SO_PEERCRED`` of a connected Unix socket."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerIdentity(pid, uid, gid)


class PeerHandshakeServer:
    """The ``<unix_socket>.peer`` listener: one token line per connection."""

    def __init__(self, path: str, registry: PeerRegistry, *, mode: int = 0o660) -> None:
        self.path = path
        self.registry = registry
        self._mode = mode
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, self._mode)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            identity = peer_identity(sock)
            writer.write(self.registry.issue(identity).encode("ascii") + b"\n")
            await writer.drain()
        except (OSError, ConnectionError) as err:
            log.debug("peer handshake failed: %s", err)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
