"""Who may do what: principals, their credentials, and the rights they hold per pool.

The broker's answer to "whose memory is this" has two halves. Sessions (the holders of
caches) are issued by the broker and proven with a secret (``kvbroker.engine``); this
module is the other half: the *principal* behind a call, and whether it may act on a
pool.

A principal is named in the configuration (``[[auth.principals]]``) with any of three
credentials:

- a bearer token (``authorization: Bearer <token>`` metadata), stored only as its
  SHA-256 (``token_sha256``) or read at start from a file or an environment variable and
  hashed at once; tokens are never logged and never kept in clear after start;
- Unix peer uids (``uids``): a caller on the Unix socket whose ``SO_PEERCRED`` uid is
  listed (``kvbroker.security.peercred`` says how the daemon learns it);
- TLS client-certificate names (``tls_names``): a subject common name or DNS SAN of a
  client certificate verified against ``--tls-client-ca``.

Rights are per pool (``pools = {vista = ["allocate", "attach", "release"], "*" =
[...]}``) plus operator rights (``operator = ["list", "force_release", "defragment",
"set_limits"]`` or ``true`` for all of them). Stats (pool-level figures, no cache ids)
and health are open to any authenticated principal.

With no principal configured, authorization is off: every caller acts as the
``anonymous`` principal with every right, which is today's behaviour; the daemon says so
at start and refuses a non-loopback TCP listener without auth unless told explicitly.

Cost: one SHA-256 of the presented token per call (about a microsecond) and dictionary
look-ups; nothing proportional to the number of principals or pools.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kvbroker.core.errors import BrokerError

ALL_POOLS = "*"


class Unauthenticated(BrokerError):
    """No credential, or one that matches no principal (maps to UNAUTHENTICATED)."""


class PermissionDenied(BrokerError):
    """An authenticated principal lacks the right (maps to PERMISSION_DENIED)."""


class Action(enum.Enum):
    """What a call does. Pool actions are granted per pool; operator actions broker-wide."""

    ALLOCATE = "allocate"
    ATTACH = "attach"  # also pin and unpin: they act on a cache the caller may map
    RELEASE = "release"
    LIST = "list"  # every tenant's caches and sessions (others see their own pools')
    FORCE_RELEASE = "force_release"  # free a cache other holders hold
    DEFRAGMENT = "defragment"
    SET_LIMITS = "set_limits"
    CHECKPOINT = "checkpoint"  # write persistent pools' caches to disk now


POOL_ACTIONS = frozenset({Action.ALLOCATE, Action.ATTACH, Action.RELEASE})
OPERATOR_ACTIONS = frozenset(Action) - POOL_ACTIONS


@dataclass(frozen=True)
class Principal:
    """A named identity and its rights. ``token_sha256`` holds digests, never tokens."""

    name: str
    pools: Mapping[str, frozenset[Action]] = field(default_factory=dict)
    operator: frozenset[Action] = frozenset()
    token_sha256: frozenset[bytes] = frozenset()
    uids: frozenset[int] = frozenset()
    tls_names: frozenset[str] = frozenset()

    def may(self, action: Action, pool: str | None = None) -> bool:
        """Whether this principal holds ``action`` (on ``pool`` for a pool action)."""
        if action in OPERATOR_ACTIONS:
            return action in self.operator
        if pool is None:
            return False
        rights = self.pools.get(pool)
        if rights is not None and action in rights:
            return True
        wildcard = self.pools.get(ALL_POOLS)
        return wildcard is not None and action in wildcard

    def pools_with(self, action: Action) -> frozenset[str] | None:
        """Pools on which this principal holds ``action``; None means every pool."""
        wildcard = self.pools.get(ALL_POOLS)
        if wildcard is not None and action in wildcard:
            return None
        return frozenset(p for p, rights in self.pools.items() if action in rights)


#: The principal every caller is when authorization is off: all rights, as before auth.
ANONYMOUS = Principal(
    "anonymous", pools={ALL_POOLS: POOL_ACTIONS}, operator=OPERATOR_ACTIONS
)


@dataclass(frozen=True)
class Credentials:
    """What a call presented: a bearer token, a Unix peer uid, TLS certificate names."""

    bearer: str | None = None
    peer_uid: int | None = None
    peer_pid: int | None = None
    tls_names: tuple[str, ...] = ()


def token_digest(token: str) -> bytes:
    """The stored form of a token: SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).digest()


class AuthPolicy:
    """The configured principals, indexed by each kind of credential.

    Invariant: a token digest, a uid and a TLS name each belong to at most one principal
    (checked at construction), so a credential never means two identities.
    """

    def __init__(self, principals: Sequence[Principal] = ()) -> None:
        self.principals = tuple(principals)
        self._by_token: dict[bytes, Principal] = {}
        self._by_uid: dict[int, Principal] = {}
        self._by_tls: dict[str, Principal] = {}
        names: set[str] = set()
        for p in self.principals:
            if p.name in names:
                raise ValueError(f"principal {p.name!r} is defined twice")
            names.add(p.name)
            for index, keys in ((self._by_token, p.token_sha256), (self._by_uid, p.uids), (self._by_tls, p.tls_names)):
                for key in keys:
                    other = index.setdefault(key, p)
                    if other is not p:
                        raise ValueError(
                            f"principals {other.name!r} and {p.name!r} share a credential"
                        )

    @property
    def enabled(self) -> bool:
        return bool(self.principals)

    def authenticate(self, creds: Credentials) -> Principal:
        """The principal the credentials prove. A bearer token is checked first (a wrong
        one is refused even if the peer uid would match: a caller that presents a secret
        means it); then the TLS names, then the peer uid.

        Raises ``Unauthenticated`` when authorization is on and nothing matches.
        """
        if not self.enabled:
            return ANONYMOUS
        if creds.bearer is not None:
            digest = token_digest(creds.bearer)
            principal = self._by_token.get(digest)
            if principal is None or not any(hmac.compare_digest(digest, d) for d in principal.token_sha256):
                raise Unauthenticated("the bearer token matches no principal")
            return principal
        for name in creds.tls_names:
            principal = self._by_tls.get(name)
            if principal is not None:
                return principal
        if creds.peer_uid is not None:
            principal = self._by_uid.get(creds.peer_uid)
            if principal is not None:
                return principal
        raise Unauthenticated(
            "this broker requires credentials: a bearer token (authorization metadata), "
            "a client certificate, or a Unix peer uid named in [[auth.principals]]"
        )

    @staticmethod
    def check(principal: Principal, action: Action, pool: str | None = None) -> None:
        """Raise ``PermissionDenied`` unless ``principal`` may do ``action`` on ``pool``."""
        if not principal.may(action, pool):
            where = f" on pool {pool[:64]!r}" if pool is not None and action in POOL_ACTIONS else ""
            raise PermissionDenied(f"principal {principal.name!r} may not {action.value}{where}")


def parse_actions(key: str, value: object, allowed: Iterable[Action]) -> frozenset[Action]:
    """Actions from a list of names (``["allocate", "attach"]``) or ``true`` (all of
    ``allowed``). Raises ``ValueError`` naming ``key``."""
    allowed = frozenset(allowed)
    if value is True:
        return allowed
    if value is False:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: expected a list of actions or true, got {value!r}")
    by_name = {a.value: a for a in allowed}
    out = set()
    for name in value:
        if name not in by_name:
            raise ValueError(f"{key}: unknown action {name!r} (known: {', '.join(sorted(by_name))})")
        out.add(by_name[name])
    return frozenset(out)


def load_token(key: str, *, sha256: str | None, file: str | None, env: str | None, environ: Mapping[str, str] | None = None) -> frozenset[bytes]:
    """The digests of a principal's token, from exactly one source. The token itself is
    read, hashed and dropped; error messages never include it."""
    sources = [s for s in (sha256, file, env) if s is not None]
    if len(sources) > 1:
        raise ValueError(f"{key}: give one of token_sha256, token_file, token_env")
    if sha256 is not None:
        try:
            digest = bytes.fromhex(sha256)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError(f"{key}.token_sha256: expected 64 hex digits (sha256sum of the token)")
        return frozenset({digest})
    if file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as err:
            raise ValueError(f"{key}.token_file: cannot read {file}: {err.strerror}") from None
        if not token:
            raise ValueError(f"{key}.token_file: {file} is empty")
        return frozenset({token_digest(token)})
    if env is not None:
        token = (os.environ if environ is None else environ).get(env, "").strip()
        if not token:
            raise ValueError(f"{key}.token_env: the variable {env} is not set or empty")
        return frozenset({token_digest(token)})
    return frozenset()
