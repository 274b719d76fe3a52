"""The client's records of what it holds and of its session's phase (``core.py`` owns
and changes them; ``Cache`` reads them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvbroker.v1 import broker_pb2 as pb


class HeldState(enum.Enum):
    """What a held cache may be used for now."""

    LIVE = "live"  # views may be built from the handle
    STALE = "stale"  # moved: one Attach fetches the new place first
    EVICTED = "evicted"  # the bytes are gone: CacheEvicted
    RELEASED = "released"  # this client dropped its hold
    LOST = "lost"  # the session it was held under ended: SessionLost, or re-attach if retained


@dataclass(eq=False)
class Held:
    """One cache this client holds: the broker's record and handle as last seen, and
    what the Watch stream said since. Shared by every ``Cache`` object of the same id
    (one client is one holder: releasing through one object drops the hold of all)."""

    info: pb.Cache
    handle: pb.Handle
    generation: int  # the session the hold was taken under
    moved_epoch: int = 0
    evicted: bool = False
    released: bool = False
    lost: str = ""  # why its session ended; "" while the session holds it
    gone: str = ""  # why it did not survive its session's end (CacheLost); "" otherwise

    @property
    def cache_id(self) -> str:
        return self.info.cache_id


class Phase(enum.Enum):
    ANONYMOUS = "anonymous"  # no session: the broker's anonymous holder (operators)
    CONNECTING = "connecting"  # the current session id's Watch is not open (yet)
    OPEN = "open"
    CLOSED = "closed"
