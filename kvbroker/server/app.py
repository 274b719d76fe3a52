"""Server assembly: the CacheBroker servicer, health and reflection on one grpc.aio server.

``create_server`` binds every address before returning, so a port clash fails the
start instead of leaving a half-listening daemon, and returns the bound ports (tests
bind port 0). Health reports SERVING for "" and ``kvbroker.v1.CacheBroker`` until
``enter_shutdown`` flips both to NOT_SERVING, which Kubernetes probes and load
balancers read before the server stops taking calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvbroker.engine import Engine
from kvbroker.security import AuthPolicy, PeerRegistry
from kvbroker.server.gate import Gate
from kvbroker.server.registration import SERVICE, add_cache_broker
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


async def create_server(
    engine: Engine,
    *,
    listen: str | None,
    unix_socket: str | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    policy: AuthPolicy | None = None,
    peers: PeerRegistry | None = None,
    tls: TlsFiles | None = None,
) -> BrokerServer:
    """Build the server and bind ``listen`` (host:port, with ``tls`` when given) and
    ``unix_socket`` (a path, never TLS: its file mode and peer credentials protect it).
    ``interceptors`` see every call (telemetry's: durations, status codes, spans);
    ``policy`` and ``peers`` are the ``Gate``'s (authorization off by default).

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
    add_cache_broker(CacheBrokerServicer(engine, Gate(engine, policy, peers)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    tcp_port = None
    if listen:
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
        try:
            bound = server.add_insecure_port(f"unix:{unix_socket}")
        except RuntimeError as err:
            raise RuntimeError(f"cannot listen on unix socket {unix_socket}: {err}") from None
        if not bound:
            raise RuntimeError(f"cannot listen on unix socket {unix_socket}")
    return BrokerServer(server, health_servicer, tcp_port, unix_socket)
