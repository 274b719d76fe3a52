"""kvbroker_client: map KV-cache memory from a kvbroker daemon as torch tensors, zero-copy.

    from kvbroker_client import BrokerClient

    with BrokerClient("127.0.0.1:50051") as client:
        with client.allocate("default", dtype="float16", shape=(2, 32, 128)) as cache:
            kv = cache.tensor()  # a view of the broker's memory: no copy

Imports only the generated wire code (``kvbroker.v1``), grpc and torch, never a server
module. ``kvbroker_client.mapping`` turns broker handles into tensors; it and torch are
imported on first use, so tools that only query the broker (the ``kvbroker`` CLI) start
fast.
"""

from typing import TYPE_CHECKING, Any

from kvbroker import __version__  # one version for the whole distribution
from kvbroker_client.cache import AsyncCache, Cache
from kvbroker_client.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, AsyncBrokerClient, BrokerClient
from kvbroker_client.errors import (
    AllocationTimeout,
    BrokerUnavailable,
    CacheAlreadyExists,
    CacheEvicted,
    CacheExhausted,
    CacheNotFound,
    InvalidRequest,
    KvBrokerError,
    PreconditionFailed,
    UnexpectedBrokerError,
)

if TYPE_CHECKING:
    from kvbroker_client.mapping import HandleError, SegmentMapper, StaleHandleError

_LAZY_FROM_MAPPING = ("HandleError", "SegmentMapper", "StaleHandleError")

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_S",
    "AllocationTimeout",
    "AsyncBrokerClient",
    "AsyncCache",
    "BrokerClient",
    "BrokerUnavailable",
    "Cache",
    "CacheAlreadyExists",
    "CacheEvicted",
    "CacheExhausted",
    "CacheNotFound",
    "HandleError",
    "InvalidRequest",
    "KvBrokerError",
    "PreconditionFailed",
    "SegmentMapper",
    "StaleHandleError",
    "UnexpectedBrokerError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Names of ``kvbroker_client.mapping`` (which imports torch), resolved on first use."""
    if name in _LAZY_FROM_MAPPING:
        from kvbroker_client import mapping

        return getattr(mapping, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
