"""Constants of the wire contract that the daemon and the client stub must agree on.

Standard library only, so the pure core, the server and ``kvbroker_client`` can all
import it (the client imports no other ``kvbroker`` module but the generated
``kvbroker.v1``). Each constant is written here once; ``tests/test_wire.py`` checks the
dtype table against the generated ``Dtype`` enum, so the two cannot drift apart.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

#: Request metadata naming the caller's session (its holder id). Lower case: gRPC
#: metadata keys are case-insensitive and transmitted lower-cased.
SESSION_ID_KEY = "kvbroker-session-id"
#: Request metadata carrying the secret the broker issued when the session opened
#: (``WatchEvent.session_secret``); without it a session id grants nothing.
SESSION_SECRET_KEY = "kvbroker-session-secret"
#: Request metadata carrying an operator's or worker's bearer token (``Bearer <token>``).
AUTHORIZATION_KEY = "authorization"

#: Ids (caches, pools, sessions, devices) travel in logs, metric labels and file names:
#: 1 to ``ID_MAX_CHARS`` printable ASCII characters, no spaces, starting with a letter or
#: digit.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")
ID_MAX_CHARS = 128

#: Every host shm object the daemon creates, and every name a client will open, matches
#: this: ``kvb-<pid>-<instance>-<segment_id>-<generation>`` under the handle's directory.
SHM_NAME_PATTERN = re.compile(r"kvb-[A-Za-z0-9_.-]{1,200}")
#: torch's CUDA IPC ref-counter shm name: ``/torch_<pid>_<random>`` (older torch) or with
#: more ``_<n>`` parts (2.11+).
REF_COUNTER_NAME_PATTERN = re.compile(rb"/torch_\d+(?:_\d+){1,3}")


#: Size units, as the configuration and the client accept them (case-insensitive): binary
#: ``Ki``/``KiB``... are powers of 1024, decimal ``K``/``KB``... powers of 1000.
SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}  # fmt: skip


class WireDtype(NamedTuple):
    """One element type: its ``kvbroker.v1.Dtype`` value, torch-style name and width."""

    value: int
    name: str
    itemsize: int


#: The one dtype table: wire value, torch attribute name, bytes per element.
DTYPES: tuple[WireDtype, ...] = (
    WireDtype(1, "uint8", 1),
    WireDtype(2, "int8", 1),
    WireDtype(3, "int16", 2),
    WireDtype(4, "int32", 4),
    WireDtype(5, "int64", 8),
    WireDtype(6, "float16", 2),
    WireDtype(7, "bfloat16", 2),
    WireDtype(8, "float32", 4),
    WireDtype(9, "float64", 8),
    WireDtype(10, "bool", 1),
    WireDtype(11, "float8_e4m3fn", 1),
    WireDtype(12, "float8_e5m2", 1),
)
DTYPE_BY_VALUE: dict[int, WireDtype] = {d.value: d for d in DTYPES}
DTYPE_BY_NAME: dict[str, WireDtype] = {d.name: d for d in DTYPES}


class SessionEndReason(enum.Enum):
    """Why a session ended. The value is the telemetry label and the text told to the
    client in ``EVENT_KIND_SESSION_ENDED``'s reason."""

    STREAM_CLOSED = "stream_closed"
    LEASE_EXPIRED = "lease_expired"
    BROKER_STOPPING = "broker_stopping"
    ENDED_BY_OPERATOR = "ended_by_operator"  # EndSessions (``kvbroker sessions --end-older-than``)

#: Request metadata carrying a peer token from the Unix handshake socket (the path of the
#: gRPC Unix socket plus ``PEER_SOCKET_SUFFIX``): it tells the broker the caller's uid/pid.
PEER_TOKEN_KEY = "kvbroker-peer-token"
PEER_SOCKET_SUFFIX = ".peer"
