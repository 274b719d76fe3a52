"""The daemon's recent errors: the last N calls that failed, for ``kvbroker stats``.

Seed 004 keeps an error history ("recent_errors", "error_count") an operator can read
without a log collector. Every call the servicer answers with a status other than OK
(a domain error, or INTERNAL for a bug) is recorded here with its time, method, status
code name and the details the caller got; Stats returns them newest first
(``StatsResponse.recent_errors``) with the count since the start (``errors_total``).

Bounded: a ``deque(maxlen=N)`` (N is the ``recent_errors`` setting, default 100; 0 keeps
none but still counts), so a client that fails a million calls costs N entries. Lives on
the event loop (the servicer's calls), so it needs no lock. Cost per failed call: one
append.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from kvbroker.v1 import broker_pb2 as pb

__all__ = ["DEFAULT_RECENT_ERRORS", "MAX_MESSAGE_CHARS", "RecentError", "RecentErrors"]

#: How many failed calls the daemon keeps by default.
DEFAULT_RECENT_ERRORS = 100
#: Details longer than this are cut (the caller's message is capped already).
MAX_MESSAGE_CHARS = 512


class RecentError(NamedTuple):
    unix_time: float
    method: str
    code: str  # grpc.StatusCode name
    message: str


class RecentErrors:
    """The last ``capacity`` failed calls and how many failed in all."""

    def __init__(self, capacity: int = DEFAULT_RECENT_ERRORS, clock: Callable[[], float] = time.time) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self._entries: deque[RecentError] = deque(maxlen=capacity)
        self._clock = clock
        self.total = 0

    def add(self, method: str, code: str, message: str) -> None:
        self.total += 1
        self._entries.append(RecentError(self._clock(), method, code, message[:MAX_MESSAGE_CHARS]))

    def newest_first(self) -> list[RecentError]:
        return list(reversed(self._entries))

    def fill(self, response: pb.StatsResponse) -> pb.StatsResponse:
        """Add the entries and the total to a Stats answer."""
        response.errors_total = self.total
        for entry in reversed(self._entries):
            item = response.recent_errors.add(method=entry.method, code=entry.code, message=entry.message)
            item.time.FromNanoseconds(int(entry.unix_time * 1e9))
        return response
