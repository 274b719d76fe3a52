"""The credentials a gRPC call presents, read from its metadata and its transport.

- ``authorization: Bearer <token>`` metadata (``wire.AUTHORIZATION_KEY``);
- ``kvbroker-peer-token`` metadata, resolved to the Unix uid/pid it was issued to by the
  handshake socket (``kvbroker/security/peercred.py``);
- on a TLS connection whose client certificate was verified against ``--tls-client-ca``,
  the certificate's subject common name and subject alternative names, as gRPC's auth
  context reports them (``x509_common_name``, ``x509_subject_alternative_name``).

Cost: one scan of the call's metadata (a handful of pairs) and, only where a principal
is named by a certificate, one auth-context look-up.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc

from kvbroker.security import Credentials, PeerRegistry
from kvbroker.security.policy import Unauthenticated
from kvbroker.wire import AUTHORIZATION_KEY, PEER_TOKEN_KEY, SESSION_ID_KEY, SESSION_SECRET_KEY

_BEARER = "bearer "
_TLS_NAME_KEYS = ("x509_common_name", "x509_subject_alternative_name")


class CallIdentity(NamedTuple):
    """What a call presented: its credentials, and the session it names (if any)."""

    credentials: Credentials
    session_id: str
    session_secret: str | None


def read_call(context: grpc.aio.ServicerContext, peers: PeerRegistry | None, *, tls_names: bool) -> CallIdentity:
    """One pass over the call's metadata: bearer token, peer token, session id and secret;
    the TLS certificate names only when ``tls_names`` (some principal is named by one:
    reading gRPC's auth context costs more than the rest together).

    Raises ``Unauthenticated`` for a malformed authorization header (a caller that sends
    one means to be checked by it)."""
    bearer = peer = secret = None
    session_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_ID_KEY:
            session_id = value if isinstance(value, str) else ""
        elif key == SESSION_SECRET_KEY:
            secret = value if isinstance(value, str) else None
        elif key == AUTHORIZATION_KEY:
            if not isinstance(value, str) or not value[: len(_BEARER)].lower() == _BEARER:
                raise Unauthenticated("the authorization metadata must read 'Bearer <token>'")
            bearer = value[len(_BEARER):].strip()
        elif key == PEER_TOKEN_KEY and peers is not None and isinstance(value, str):
            peer = peers.resolve(value)
    names: tuple[str, ...] = ()
    if tls_names:
        auth = context.auth_context() or {}
        if auth.get("transport_security_type") == [b"ssl"] and auth.get("x509_pem_cert"):
            names = tuple(v.decode("utf-8", "replace") for key in _TLS_NAME_KEYS for v in auth.get(key, ()))
    credentials = Credentials(
        bearer=bearer, peer_uid=peer.uid if peer else None, peer_pid=peer.pid if peer else None, tls_names=names,
    )  # fmt: skip
    return CallIdentity(credentials, session_id, secret)


def call_credentials(context: grpc.aio.ServicerContext, peers: PeerRegistry | None) -> Credentials:
    """The credentials ``context``'s call presented (TLS names included)."""
    return read_call(context, peers, tls_names=True).credentials
