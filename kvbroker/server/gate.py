"""Who is calling and whether they may: the one check at the door of every RPC.

A call is identified in three steps, each refusing with a clear status:

1. **Principal** (``kvbroker.security``): the credentials the call presents (bearer token,
   TLS client certificate, Unix peer uid through the handshake socket) name a configured
   principal, or the call is UNAUTHENTICATED. With no principal configured everyone is
   the all-powerful ``anonymous`` principal (today's behaviour; the daemon says so).
2. **Session**: a call that names a session (``kvbroker-session-id``) must carry that
   session's secret (``kvbroker-session-secret``) and come from the principal that
   opened it, else UNAUTHENTICATED; an unknown id opens a lease-only session and its new
   secret goes back in the call's initial metadata. A call without a session acts as the
   principal's own sessionless holder (``"~name"``; ``""`` when authorization is off), so
   two principals never share holds.
3. **Rights**: allocate on the request's pool; attach (also pin, unpin) and release on
   the cache's pool; force-releasing a cache that another holder holds (and evicting a
   pool's caches: ``force_release``), listing other pools' caches and the holders of
   caches (``list``), defragmenting and changing a pool's limits (``set_limits``) need
   operator rights. Else PERMISSION_DENIED.

Cost per call: a metadata scan, at most one SHA-256, a few dictionary look-ups, and for
cache calls one core look-up of the cache's pool.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import grpc

from kvbroker.core import ANONYMOUS_HOLDER, SESSIONLESS_PREFIX, CacheInfo
from kvbroker.core.errors import FailedPrecondition, InvalidArgument, NotFound
from kvbroker.core.types import validate_id
from kvbroker.engine import Engine
from kvbroker.security import (
    ANONYMOUS,
    Action,
    AuthPolicy,
    Credentials,
    PeerIdentity,
    PeerRegistry,
    Principal,
)
from kvbroker.server.identity import read_call
from kvbroker.wire import SESSION_ID_KEY, SESSION_SECRET_KEY


class Caller(NamedTuple):
    """An identified call: the holder it acts as, its principal and Unix peer."""

    holder: str
    principal: Principal
    peer: PeerIdentity | None

    @property
    def session_id(self) -> str:
        """The session the call named ("" for a sessionless call)."""
        return "" if not self.holder or self.holder[0] == SESSIONLESS_PREFIX else self.holder


class Watcher(NamedTuple):
    """A Watch call, identified: the session it opens or joins, with what it presented."""

    session_id: str
    secret: str | None
    principal: Principal
    peer: PeerIdentity | None


@functools.lru_cache(maxsize=4096)
def _valid_session_id(value: str) -> str:
    """Validate a session id once per distinct value (every RPC of a session sends it)."""
    return validate_id(SESSION_ID_KEY, value)


class Gate:
    """Identification and authorization for the servicer (see the module docstring)."""

    def __init__(self, engine: Engine, policy: AuthPolicy | None = None, peers: PeerRegistry | None = None) -> None:
        self._engine = engine
        self.policy = policy or AuthPolicy()
        self.peers = peers
        self._tls_names = any(p.tls_names for p in self.policy.principals)

    async def caller(self, context: grpc.aio.ServicerContext, *, session_required: str = "") -> Caller:
        """Identify the call (steps 1 and 2). ``session_required`` names the action when
        the call is meaningless without a session (Heartbeat, ReportUnmapped)."""
        call = read_call(context, self.peers, tls_names=self._tls_names)
        principal = self.policy.authenticate(call.credentials)
        peer = self.peer_of(call.credentials)
        session_id, secret = call.session_id, call.session_secret
        if not session_id:
            if session_required:
                raise InvalidArgument(SESSION_ID_KEY, f"is required to {session_required}")
            return Caller(self.sessionless_holder(principal), principal, peer)
        _valid_session_id(session_id)
        new_secret = self._engine.identify(session_id, secret, principal=principal.name, peer=peer)
        if new_secret is not None:
            await context.send_initial_metadata(((SESSION_SECRET_KEY, new_secret),))
        return Caller(session_id, principal, peer)

    def watcher(self, context: grpc.aio.ServicerContext, requested_session_id: str) -> Watcher:
        """Who opens a Watch, and for which session: named by the metadata, else by the
        request. The engine checks the secret when the session exists already."""
        call = read_call(context, self.peers, tls_names=self._tls_names)
        principal = self.policy.authenticate(call.credentials)
        session_id = call.session_id or requested_session_id
        if not session_id:
            raise InvalidArgument(SESSION_ID_KEY, "is required to open a session")
        _valid_session_id(session_id)
        return Watcher(session_id, call.session_secret, principal, self.peer_of(call.credentials))

    @staticmethod
    def peer_of(credentials: Credentials) -> PeerIdentity | None:
        if credentials.peer_uid is None:
            return None
        return PeerIdentity(credentials.peer_pid or 0, credentials.peer_uid, -1)

    def sessionless_holder(self, principal: Principal) -> str:
        return ANONYMOUS_HOLDER if principal is ANONYMOUS else SESSIONLESS_PREFIX + principal.name

    def on_pool(self, caller: Caller, action: Action, pool: str) -> None:
        """Raise ``PermissionDenied`` unless the caller may do ``action`` on ``pool``."""
        self.policy.check(caller.principal, action, pool)

    def operator(self, caller: Caller, action: Action) -> None:
        self.policy.check(caller.principal, action)

    def on_cache(self, caller: Caller, action: Action, cache_id: str, *, force: bool = False) -> None:
        """Raise ``PermissionDenied`` unless the caller may do ``action`` on the cache's
        pool (and, with ``force``, free a cache another holder holds). A cache the core
        no longer knows is left to the engine's own answer (NOT_FOUND, or a harmless
        second Release)."""
        if caller.principal is ANONYMOUS:
            return
        try:
            info: CacheInfo = self._engine.cache(cache_id)
        except (NotFound, FailedPrecondition):
            return
        principal = caller.principal
        if force and principal.may(Action.FORCE_RELEASE):
            return  # an operator frees any cache (the core still refuses another's pin)
        self.policy.check(principal, action, info.pool)
        if force and (info.holders - {caller.holder}):
            self.policy.check(principal, Action.FORCE_RELEASE)

    def visible_pools(self, caller: Caller) -> frozenset[str] | None:
        """Pools whose caches the caller may list (None: every pool)."""
        if caller.principal.may(Action.LIST):
            return None
        return caller.principal.pools_with(Action.ATTACH)
