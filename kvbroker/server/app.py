"""Server assembly: the CacheBroker servicer, health and reflection on one grpc.aio server.

``create_server`` binds every address before returning, so a port clash fails the
start instead of leaving a half-listening daemon, and returns the bound ports (tests
bind port 0). Each address is first bound and released with a plain socket
(``check_bindable``): an address in use, not local or not permitted fails the start
with the system's reason in the daemon's own message, before gRPC's C core tries it and
prints its own ``E1201 ... add_port.cc`` line to the daemon's stderr. Health reports SERVING for "" and ``kvbroker.v1.CacheBroker`` until
``enter_shutdown`` flips both to NOT_SERVING, which Kubernetes probes and load
balancers read before the server stops taking calls.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvbroker.engine import Engine
from kvbroker.security import AuthPolicy, PeerRegistry
from kvbroker.server.errorlog import DEFAULT_RECENT_ERRORS, RecentErrors
from kvbroker.server.gate import Gate
from kvbroker.server.registration import SERVICE, add_cache_broker
from kvbroker.engine.paged import PagedPools
from kvbroker.server.servicer import CacheBrokerServicer

SERVICE_NAME = SERVICE.full_name

#: Handles and stats are small; 16 MiB leaves room for large ListCaches pages.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class BrokerServer:
    """A built, bound, not yet started server."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    tcp_port: int | None
    unix_socket: str | None

    async def start(self) -> None:
        await self.server.start()

    async def enter_shutdown(self) -> None:
        """Report NOT_SERVING on every service (before stopping)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_seconds: float) -> None:
        await self.server.stop(grace_seconds)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the TCP listener: the server's chain and key, and the CA that
    client certificates must chain to ("" for TLS without client certificates)."""

    cert: str
    key: str
    client_ca: str = ""

    def credentials(self) -> grpc.ServerCredentials:
        with open(self.cert, "rb") as f:
            chain = f.read()
        with open(self.key, "rb") as f:
            key = f.read()
        ca = None
        if self.client_ca:
            with open(self.client_ca, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)


def check_bindable(listen: str | None = None, *, unix_socket: str | None = None) -> None:
    """Bind ``listen`` (host:port) or ``unix_socket`` the way gRPC will, with a plain
    socket, and let it go at once. Raises ``RuntimeError`` naming the address and the
    system's reason ("address already in use", "cannot assign requested address", "no
    such file or directory") when it cannot be bound.

    gRPC's C core reports a failed bind only as a log line on file descriptor 2 and a
    generic exception; checking first keeps a failed start to one line that says why.
    Like gRPC, a TCP address passes when any of the addresses it resolves to binds, with
    ``SO_REUSEADDR`` (gRPC sets it, so a port in TIME_WAIT is not "in use"). An address
    taken by another process between this check and gRPC's bind still gets gRPC's line."""
    if unix_socket is not None:
        if os.path.exists(unix_socket):
            return  # a live socket was refused and a stale one removed (kvbroker/daemon.py)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(unix_socket)
            except OSError as err:
                raise RuntimeError(f"cannot listen on unix socket {unix_socket}: {_reason(err)}") from None
        os.unlink(unix_socket)
        return
    assert listen is not None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, ValueError) as err:
        raise RuntimeError(f"cannot listen on {listen}: cannot resolve {host!r}: {_reason(err)}") from None
    reasons = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                reasons.append(_reason(err))
            else:
                return
    raise RuntimeError(f"cannot listen on {listen}: {'; '.join(dict.fromkeys(reasons))}")


def _reason(err: Exception) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return text[:1].lower() + text[1:]


async def create_server(
    engine: Engine,
    *,
    listen: str | None,
    unix_socket: str | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    policy: AuthPolicy | None = None,
    peers: PeerRegistry | None = None,
    tls: TlsFiles | None = None,
    recent_errors: int = DEFAULT_RECENT_ERRORS,
    paged: PagedPools | None = None,
) -> BrokerServer:
    """Build the server and bind ``listen`` (host:port, with ``tls`` when given) and
    ``unix_socket`` (a path, never TLS: its file mode and peer credentials protect it).
    ``interceptors`` see every call (telemetry's: durations, status codes, spans);
    ``policy`` and ``peers`` are the ``Gate``'s (authorization off by default);
    ``recent_errors``: how many failed calls Stats reports (``kvbroker.server.errorlog``).

    Raises:
        RuntimeError: an address could not be bound (named in the message).
    """
    if not listen and not unix_socket:
        raise ValueError("the server needs a TCP address or a Unix socket")
    server = grpc.aio.server(
        interceptors=list(interceptors) or None,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    add_cache_broker(CacheBrokerServicer(engine, Gate(engine, policy, peers), RecentErrors(recent_errors), paged), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    tcp_port = None
    if listen:
        check_bindable(listen)
        try:
            if tls is not None:
                tcp_port = server.add_secure_port(listen, tls.credentials())
            else:
                tcp_port = server.add_insecure_port(listen)
        except RuntimeError as err:
            raise RuntimeError(f"cannot listen on {listen}: {err}") from None
        if not tcp_port:
            raise RuntimeError(f"cannot listen on {listen}: the address is in use or invalid")
    if unix_socket:
        check_bindable(unix_socket=unix_socket)
        try:
            bound = server.add_insecure_port(f"unix:{unix_socket}")
        except RuntimeError as err:
            raise RuntimeError(f"cannot listen on unix socket {unix_socket}: {err}") from None
        if not bound:
            raise RuntimeError(f"cannot listen on unix socket {unix_socket}")
    return BrokerServer(server, health_servicer, tcp_port, unix_socket)
