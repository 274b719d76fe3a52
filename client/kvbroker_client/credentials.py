"""What a client proves to the broker: a bearer token, a TLS client certificate, and on
the Unix socket its uid (the peer handshake, ``peercred.py``).

The broker's principals (``[[auth.principals]]`` in its configuration) name these; a
broker without principals needs none of them. Each setting comes from the constructor's
argument, else from the environment, the same variables the ``kvbroker`` CLI reads:

| argument | variable | meaning |
|---|---|---|
| ``token`` | ``KVBROKER_TOKEN`` (or ``KVBROKER_TOKEN_FILE``) | sent as ``authorization: Bearer <token>`` |
| ``tls_ca`` | ``KVBROKER_TLS_CA`` | PEM CA bundle the broker's certificate must chain to: TLS on |
| ``tls_cert``, ``tls_key`` | ``KVBROKER_TLS_CERT``, ``KVBROKER_TLS_KEY`` | client certificate (mutual TLS) |

Cost: files are read once, at construction; the peer token is fetched once per client
(retried at most once a second while the broker's handshake socket is not there).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvbroker import wire
from kvbroker_client.errors import InvalidRequest
from kvbroker_client.peercred import fetch_peer_token, unix_path

PEER_RETRY_S = 1.0


@dataclass
class Credentials:
    """A client's credentials (see the module docstring). ``Credentials.resolve`` fills
    what the arguments leave out from the environment."""

    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    _peer_token: str | None = field(default=None, repr=False)
    _peer_tried: float = field(default=-PEER_RETRY_S, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def resolve(
        cls, token: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
        tls_key: str | None = None, environ: Any = None,
    ) -> Credentials:  # fmt: skip
        env = os.environ if environ is None else environ
        if token is None:
            token = env.get("KVBROKER_TOKEN") or None
            path = env.get("KVBROKER_TOKEN_FILE")
            if token is None and path:
                try:
                    with open(path, encoding="utf-8") as f:
                        token = f.read().strip() or None
                except OSError as err:
                    raise InvalidRequest(f"KVBROKER_TOKEN_FILE: cannot read {path}: {err.strerror}") from None
        creds = cls(
            token, tls_ca or env.get("KVBROKER_TLS_CA") or None, tls_cert or env.get("KVBROKER_TLS_CERT") or None,
            tls_key or env.get("KVBROKER_TLS_KEY") or None,
        )  # fmt: skip
        if bool(creds.tls_cert) != bool(creds.tls_key):
            raise InvalidRequest("tls_cert: a client certificate needs its key (tls_key), and the other way round")
        if creds.tls_cert and not creds.tls_ca:
            raise InvalidRequest("tls_ca: a client certificate is sent over TLS only: give the broker's CA too")
        return creds

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as err:
                raise InvalidRequest(f"cannot read {path}: {err.strerror}") from None

        return grpc.ssl_channel_credentials(read(self.tls_ca), read(self.tls_key), read(self.tls_cert))

    def channel(self, target: str, options: Sequence[tuple[str, Any]], *, aio: bool = False) -> Any:
        """A channel to ``target`` (TLS when a CA is set; Unix targets never use TLS)."""
        module = grpc.aio if aio else grpc
        if self.tls and unix_path(target) is None:
            return module.secure_channel(target, self.channel_credentials(), options=options)
        return module.insecure_channel(target, options=options)

    def metadata(self, target: str) -> tuple[tuple[str, str], ...]:
        """What every call carries: the bearer token and the peer token, when known."""
        out: tuple[tuple[str, str], ...] = ()
        if self.token:
            out += ((wire.AUTHORIZATION_KEY, f"Bearer {self.token}"),)
        peer = self._peer(target)
        if peer:
            out += ((wire.PEER_TOKEN_KEY, peer),)
        return out

    def _peer(self, target: str) -> str | None:
        if self._peer_token is not None or unix_path(target) is None:
            return self._peer_token
        with self._lock:
            now = time.monotonic()
            if self._peer_token is None and now - self._peer_tried >= PEER_RETRY_S:
                self._peer_tried = now
                self._peer_token = fetch_peer_token(target)
        return self._peer_token
