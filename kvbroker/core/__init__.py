"""The pure core of kvbroker: placement, eviction, compaction, pools and accounting.

Standard library only (checked by import-linter in CI): no torch, grpc, protobuf,
prometheus or opentelemetry. Not thread-safe: one owner calls it.
"""

from kvbroker.core.broker import AllocateResult, Broker
from kvbroker.core.errors import (
    AlreadyExists,
    BrokerError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvbroker.core.types import (
    ANONYMOUS_HOLDER,
    AllocationRequest,
    BrokerStats,
    CacheInfo,
    CacheState,
    CompactionPlan,
    DeviceSpec,
    Event,
    EventKind,
    Extent,
    Move,
    Placement,
    PoolSpec,
    SegmentInfo,
    Usage,
)

__all__ = [
    "ANONYMOUS_HOLDER", "AllocateResult", "AllocationRequest", "AlreadyExists", "Broker",
    "BrokerError", "BrokerStats", "DeadlineExceeded", "CacheInfo", "CacheState", "CompactionPlan", "DeviceSpec",
    "Event", "EventKind", "Extent", "FailedPrecondition", "InvalidArgument", "Move",
    "NotFound", "Placement", "PoolSpec", "ResourceExhausted", "SegmentInfo", "Usage",
]
