"""Identity and authorization: principals and their rights per pool (``policy``), the
``[auth]`` configuration (``settings``), and Unix peer credentials (``peercred``).

Standard library only; the server applies it to each call, the core never sees it.
"""

from kvbroker.security.peercred import PeerHandshakeServer, PeerIdentity, PeerRegistry
from kvbroker.security.policy import (
    ANONYMOUS,
    Action,
    AuthPolicy,
    Credentials,
    PermissionDenied,
    Principal,
    Unauthenticated,
    token_digest,
)
from kvbroker.security.settings import parse_auth

__all__ = [
    "ANONYMOUS", "Action", "AuthPolicy", "Credentials", "PeerHandshakeServer", "PeerIdentity",
    "PeerRegistry", "PermissionDenied", "Principal", "Unauthenticated", "parse_auth", "token_digest",
]
