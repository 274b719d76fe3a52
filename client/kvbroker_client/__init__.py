"""kvbroker_client: map KV-cache memory from a kvbroker daemon as torch tensors, zero-copy.

    from kvbroker_client import BrokerClient

    with BrokerClient("127.0.0.1:50051") as client:
        with client.allocate("default", dtype="float16", shape=(2, 32, 128)) as cache:
            kv = cache.tensor()  # a view of the broker's memory: no copy

Layout (each module imports only those above it; ``tests/client/test_layout.py`` checks
that there is no import circle):

    errors.py   typed exceptions, one per gRPC status, ``SessionLost`` and ``CacheLost``
    dtypes.py   dtype names <-> wire values <-> torch dtypes (``kvbroker.wire.DTYPES``)
    units.py    sizes ("512MiB", size_mb=) and priority names ("high") to the wire's
    calls.py    target, channel options, ``Call``, request builders (validation)
    summary.py  Stats as the kvcached guide's statistics dict (GiB, percent)
    handles.py  host handles checked without torch: path, identity, ``HandleError``
    session.py  the sans-IO session rules: Watch, events, losses, heartbeats
    core.py     the sans-IO core: held caches, the session, plans; no I/O
    revoke.py   re-mapping a released range of views to private memory (libc mmap)
    mapping.py  ``SegmentMapper``: handles -> mapped segments -> views (imports torch)
    cache.py    ``Cache`` and ``AsyncCache``: a ``Held`` record and its client's ``drive``
    paged.py    ``PagedPool``: a paged KV pool's arena as per-layer tensors, sequences, appends
    paged_aio.py ``AsyncPagedPool``: the same for ``AsyncBrokerClient``, its calls awaited
    sync.py     ``BrokerClient``: grpc channel, Watch and heartbeat threads
    aio.py      ``AsyncBrokerClient``: grpc.aio channel, Watch and heartbeat tasks

Not imported here (each on demand, by its users):

    kv_storage.py    ``KVStorage``: every layer's K/V in one broker cache (imports torch)
    transformers.py  ``BrokerCache``, a transformers ``Cache`` on ``KVStorage``, and the
                     prefill/decode hand-off (the ``transformers`` extra; nothing else of
                     the client imports transformers: an import-linter contract)

Of the broker, only ``kvbroker.wire``, ``kvbroker.kvlayout`` (the paged-KV arithmetic,
exported as ``KvLayout`` and ``kv_calc``) and the generated ``kvbroker.v1`` are imported,
never a server module. ``kvbroker_client.mapping`` and torch are imported on first view,
so tools that only query the broker (the ``kvbroker`` CLI) start fast.
"""

from typing import TYPE_CHECKING, Any

from kvbroker import __version__  # one version for the whole distribution
from kvbroker.kvlayout import Calculation, KvLayout
from kvbroker.kvlayout import calculate as kv_calc
from kvbroker_client.aio import AsyncBrokerClient
from kvbroker_client.cache import AsyncCache, Cache
from kvbroker_client.calls import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, TARGET_ENV
from kvbroker_client.errors import (
    AllocationTimeout,
    BrokerUnavailable,
    CacheAlreadyExists,
    CacheEvicted,
    CacheExhausted,
    CacheLost,
    CacheNotFound,
    InvalidRequest,
    KvBrokerError,
    NotAuthenticated,
    PermissionDenied,
    PreconditionFailed,
    SessionLost,
    UnexpectedBrokerError,
)
from kvbroker_client.handles import HandleError, StaleHandleError
from kvbroker_client.paged import DEFAULT_GRANT_TOKENS, OutOfTokens, PagedPool, SequenceEvicted, SequenceMoved, Slot
from kvbroker_client.paged_aio import AsyncPagedPool
from kvbroker_client.summary import summarize
from kvbroker_client.sync import BrokerClient
from kvbroker_client.units import PRIORITIES, parse_size

if TYPE_CHECKING:
    from kvbroker_client.mapping import SegmentMapper

_LAZY_FROM_MAPPING = ("SegmentMapper",)

__all__ = [
    "DEFAULT_GRANT_TOKENS",
    "AsyncPagedPool",
    "OutOfTokens",
    "PagedPool",
    "SequenceEvicted",
    "SequenceMoved",
    "Slot",
    "DEFAULT_TARGET",
    "PRIORITIES",
    "DEFAULT_TIMEOUT_S",
    "TARGET_ENV",
    "AllocationTimeout",
    "AsyncBrokerClient",
    "AsyncCache",
    "Calculation",
    "KvLayout",
    "kv_calc",
    "BrokerClient",
    "BrokerUnavailable",
    "Cache",
    "CacheAlreadyExists",
    "CacheEvicted",
    "CacheExhausted",
    "CacheLost",
    "NotAuthenticated",
    "PermissionDenied",
    "CacheNotFound",
    "HandleError",
    "InvalidRequest",
    "KvBrokerError",
    "PreconditionFailed",
    "SegmentMapper",
    "SessionLost",
    "StaleHandleError",
    "UnexpectedBrokerError",
    "__version__",
    "parse_size",
    "summarize",
]


def __getattr__(name: str) -> Any:
    """Names of ``kvbroker_client.mapping`` (which imports torch), resolved on first use."""
    if name in _LAZY_FROM_MAPPING:
        from kvbroker_client import mapping

        return getattr(mapping, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
