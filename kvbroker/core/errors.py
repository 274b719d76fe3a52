"""Typed domain errors of the broker core.

One class per gRPC status the daemon maps them to (the mapping table lives in
``kvbroker.server``; the core never imports grpc). Client misuse raises one of these;
a broken invariant is a bug and raises ``AssertionError``/``RuntimeError`` instead, so
that the two are never confused (Plasma's ``RAY_CHECK`` vs ``PlasmaError``).

Every message names the offending field or object, because it travels to the operator
verbatim; what it quotes of a client's input goes through ``echo``, so a 20,000-character
name costs a log line, not 20 kB of it.
"""

from __future__ import annotations

#: The most characters of a client's value that an error message quotes.
ECHO_MAX_CHARS = 64


def echo(value: object) -> str:
    """``value`` as an error message quotes it: its ``repr``, cut to ``ECHO_MAX_CHARS``
    characters of the value and marked with an ellipsis when cut. Cost: O(ECHO_MAX_CHARS)
    for a string, an integer or a sequence (whose first ``ECHO_MAX_CHARS`` items are
    shown); the length of its ``repr`` for anything else."""
    if isinstance(value, str | bytes) and len(value) > ECHO_MAX_CHARS:
        return f"{value[:ECHO_MAX_CHARS]!r}... ({len(value)} characters)"
    if isinstance(value, int) and value.bit_length() > 4 * ECHO_MAX_CHARS:
        return f"an integer of {value.bit_length()} bits"  # repr would cost O(digits**2)
    if isinstance(value, tuple | list) and len(value) > ECHO_MAX_CHARS:
        value = (*value[:ECHO_MAX_CHARS], ...)
    text = repr(value)
    return text if len(text) <= ECHO_MAX_CHARS else f"{text[:ECHO_MAX_CHARS]}..."


_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def amount(nbytes: int) -> str:
    """``nbytes`` as an error message states it: in binary units for a person, then
    exactly, for a script or a comparison with Stats: ``"1.46 GiB (1572864000 bytes)"``,
    ``"512 bytes"``. Two decimals at most, trailing zeros dropped (``"1 GiB"``). Byte
    counts past 64 bits (no wire field carries one) are quoted as ``echo`` does."""
    if nbytes.bit_length() > 64:
        return f"{echo(nbytes)} bytes"
    if nbytes < 1024:
        return f"{nbytes} bytes"
    value, unit = float(nbytes), "bytes"
    for unit in _BINARY_UNITS:
        value /= 1024
        if value < 1024:
            break
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{text} {unit} ({nbytes} bytes)"


class BrokerError(Exception):
    """Base of every error a client can provoke. ``str(err)`` is the client-facing text."""


class InvalidArgument(BrokerError):
    """A field is malformed or out of range (maps to INVALID_ARGUMENT).

    Attributes:
        field: the request field at fault, e.g. ``"size_bytes"``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(BrokerError):
    """An unknown pool, device or cache id (maps to NOT_FOUND)."""


class AlreadyExists(BrokerError):
    """A cache id that is already in use (maps to ALREADY_EXISTS)."""


class FailedPrecondition(BrokerError):
    """The object exists but is in the wrong state: evicted, pinned, not pinned
    (maps to FAILED_PRECONDITION)."""


class ResourceExhausted(BrokerError):
    """A request that cannot be placed now, or ever (maps to RESOURCE_EXHAUSTED).

    The message is complete as given: it says which limit was hit (the pool's quota, a
    device's capacity, free space too fragmented, pinned caches, the host's shm or a GPU
    driver), with each figure in human units and in bytes (``amount``), named as Stats
    names it, so an operator can compare it with ``kvbroker stats``.

    Attributes:
        requested_bytes: the block-rounded size that was asked for.
        free_bytes: free bytes the pool could reach on the candidate devices (inside its
            segments plus the device budget it may still claim).
        largest_free_extent_bytes: the largest contiguous free extent among them.
        satisfiable: True when the request would fit once other caches are released
            (the pool's quota and the device capacity allow it); False when it can never
            fit, so waiting for memory is pointless.
    """

    def __init__(
        self,
        message: str,
        *,
        requested_bytes: int,
        free_bytes: int,
        largest_free_extent_bytes: int,
        satisfiable: bool,
    ) -> None:
        super().__init__(message)
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
        self.largest_free_extent_bytes = largest_free_extent_bytes
        self.satisfiable = satisfiable


class DeadlineExceeded(BrokerError):
    """A waiting allocation found no room before its ``wait_timeout_ms`` ran out (maps to
    DEADLINE_EXCEEDED). The core decides that a request could fit once memory is freed
    (``ResourceExhausted.satisfiable``); the daemon does the waiting."""
