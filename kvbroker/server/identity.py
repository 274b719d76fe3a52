"""The credentials a gRPC call presents, read from its metadata and its transport.

- ``authorization: Bearer <token>`` metadata (``wire.AUTHORIZATION_KEY``);
- ``kvbroker-peer-token`` metadata, resolved to the Unix uid/pid it was issued to by the
  handshake socket (``kvbroker/security/peercred.py``);
- on a TLS connection whose client certificate was verified against ``--tls-client-ca``,
  the certificate's subject common name and subject alternative names, as gRPC's auth
  context reports them (``x509_common_name``, ``x509_subject_alternative_name``).

Cost: a scan of the call's metadata (a handful of pairs) and, on TLS, one auth-context
look-up.
"""

from __future__ import annotations

import grpc

from kvbroker.security import Credentials, PeerRegistry
from kvbroker.security.policy import Unauthenticated
from kvbroker.wire import AUTHORIZATION_KEY, PEER_TOKEN_KEY

_BEARER = "bearer "
_TLS_NAME_KEYS = ("x509_common_name", "x509_subject_alternative_name")


def call_credentials(context: grpc.aio.ServicerContext, peers: PeerRegistry | None) -> Credentials:
    """What ``context``'s call presented. Raises ``Unauthenticated`` for a malformed
    authorization header (a caller that sends one means to be checked by it)."""
    bearer = None
    peer = None
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION_KEY:
            if not isinstance(value, str) or not value[: len(_BEARER)].lower() == _BEARER:
                raise Unauthenticated("the authorization metadata must read 'Bearer <token>'")
            bearer = value[len(_BEARER):].strip()
        elif key == PEER_TOKEN_KEY and peers is not None and isinstance(value, str):
            peer = peers.resolve(value)
    names: tuple[str, ...] = ()
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") == [b"ssl"] and auth.get("x509_pem_cert"):
        names = tuple(
            v.decode("utf-8", "replace") for key in _TLS_NAME_KEYS for v in auth.get(key, ())
        )
    return Credentials(
        bearer=bearer,
        peer_uid=peer.uid if peer else None,
        peer_pid=peer.pid if peer else None,
        tls_names=names,
    )
