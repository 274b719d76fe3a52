"""The pure core of kvbroker: placement, eviction, compaction, pools and accounting.

Standard library only, plus the wire constants of ``kvbroker.wire`` (checked by
import-linter in CI): no torch, grpc, protobuf, prometheus or opentelemetry. Not
thread-safe: one owner calls it. Everything the daemon needs is exported here.
"""

from kvbroker.core.admin import Evicted, LimitsChange
from kvbroker.core.broker import Broker
from kvbroker.core.errors import (
    AlreadyExists,
    BrokerError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvbroker.core.eviction import POLICIES
from kvbroker.core.types import (
    ANONYMOUS_HOLDER,
    SESSIONLESS_PREFIX,
    is_sessionless,
    EVICTION_CAUSES,
    AllocateResult,
    Eviction,
    AllocationRequest,
    ArenaCounters,
    BrokerStats,
    CacheInfo,
    CacheState,
    CompactionPlan,
    DeviceSpec,
    DeviceStats,
    HolderSummary,
    Event,
    EventKind,
    Extent,
    Fragmentation,
    Move,
    Placement,
    PoolSpec,
    PoolStats,
    SegmentInfo,
    Usage,
    validate_id,
)

__all__ = [
    "ANONYMOUS_HOLDER", "SESSIONLESS_PREFIX", "is_sessionless", "EVICTION_CAUSES", "POLICIES", "AllocateResult", "Eviction", "AllocationRequest",
    "AlreadyExists", "ArenaCounters", "Evicted", "LimitsChange", "Broker", "BrokerError", "BrokerStats", "CacheInfo",
    "CacheState", "CompactionPlan", "DeadlineExceeded", "DeviceSpec", "DeviceStats", "HolderSummary", "Event",
    "EventKind", "Extent", "FailedPrecondition", "Fragmentation", "InvalidArgument", "Move", "NotFound",
    "Placement", "PoolSpec", "PoolStats", "ResourceExhausted", "SegmentInfo", "Usage",
    "validate_id",
]
