import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_UINT8: _ClassVar[Dtype]
    DTYPE_INT8: _ClassVar[Dtype]
    DTYPE_INT16: _ClassVar[Dtype]
    DTYPE_INT32: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_BOOL: _ClassVar[Dtype]
    DTYPE_FLOAT8_E4M3FN: _ClassVar[Dtype]
    DTYPE_FLOAT8_E5M2: _ClassVar[Dtype]

class CacheState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_STATE_UNSPECIFIED: _ClassVar[CacheState]
    CACHE_STATE_RESIDENT: _ClassVar[CacheState]
    CACHE_STATE_EVICTED: _ClassVar[CacheState]
    CACHE_STATE_PENDING: _ClassVar[CacheState]
    CACHE_STATE_OFFLOADED: _ClassVar[CacheState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_SESSION_OPENED: _ClassVar[EventKind]
    EVENT_KIND_EVICTED: _ClassVar[EventKind]
    EVENT_KIND_MOVED: _ClassVar[EventKind]
    EVENT_KIND_SEGMENT_RETIRED: _ClassVar[EventKind]
    EVENT_KIND_SHUTTING_DOWN: _ClassVar[EventKind]
    EVENT_KIND_SESSION_ENDED: _ClassVar[EventKind]

class OomStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OOM_STRATEGY_UNSPECIFIED: _ClassVar[OomStrategy]
    OOM_STRATEGY_REJECT: _ClassVar[OomStrategy]
    OOM_STRATEGY_REDUCE: _ClassVar[OomStrategy]
    OOM_STRATEGY_WAIT: _ClassVar[OomStrategy]
DTYPE_UNSPECIFIED: Dtype
DTYPE_UINT8: Dtype
DTYPE_INT8: Dtype
DTYPE_INT16: Dtype
DTYPE_INT32: Dtype
DTYPE_INT64: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_BOOL: Dtype
DTYPE_FLOAT8_E4M3FN: Dtype
DTYPE_FLOAT8_E5M2: Dtype
CACHE_STATE_UNSPECIFIED: CacheState
CACHE_STATE_RESIDENT: CacheState
CACHE_STATE_EVICTED: CacheState
CACHE_STATE_PENDING: CacheState
CACHE_STATE_OFFLOADED: CacheState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_SESSION_OPENED: EventKind
EVENT_KIND_EVICTED: EventKind
EVENT_KIND_MOVED: EventKind
EVENT_KIND_SEGMENT_RETIRED: EventKind
EVENT_KIND_SHUTTING_DOWN: EventKind
EVENT_KIND_SESSION_ENDED: EventKind
OOM_STRATEGY_UNSPECIFIED: OomStrategy
OOM_STRATEGY_REJECT: OomStrategy
OOM_STRATEGY_REDUCE: OomStrategy
OOM_STRATEGY_WAIT: OomStrategy

class Cache(_message.Message):
    __slots__ = ("cache_id", "pool", "model_name", "nbytes", "reserved_bytes", "device", "state", "epoch", "pinned", "pin_count", "holder_count", "retain", "priority", "dtype", "shape", "access_count", "created_at", "last_access_at", "holders")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    HOLDER_COUNT_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCESS_AT_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    pool: str
    model_name: str
    nbytes: int
    reserved_bytes: int
    device: str
    state: CacheState
    epoch: int
    pinned: bool
    pin_count: int
    holder_count: int
    retain: bool
    priority: int
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    access_count: int
    created_at: _timestamp_pb2.Timestamp
    last_access_at: _timestamp_pb2.Timestamp
    holders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cache_id: _Optional[str] = ..., pool: _Optional[str] = ..., model_name: _Optional[str] = ..., nbytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., device: _Optional[str] = ..., state: _Optional[_Union[CacheState, str]] = ..., epoch: _Optional[int] = ..., pinned: _Optional[bool] = ..., pin_count: _Optional[int] = ..., holder_count: _Optional[int] = ..., retain: _Optional[bool] = ..., priority: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., access_count: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_access_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., holders: _Optional[_Iterable[str]] = ...) -> None: ...

class HostSegmentHandle(_message.Message):
    __slots__ = ("shm_name", "size_bytes", "st_dev", "st_ino", "shm_dir")
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ST_DEV_FIELD_NUMBER: _ClassVar[int]
    ST_INO_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    shm_name: str
    size_bytes: int
    st_dev: int
    st_ino: int
    shm_dir: str
    def __init__(self, shm_name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., st_dev: _Optional[int] = ..., st_ino: _Optional[int] = ..., shm_dir: _Optional[str] = ...) -> None: ...

class CudaSegmentHandle(_message.Message):
    __slots__ = ("device_uuid", "torch_version", "mem_handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEM_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    torch_version: str
    mem_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, device_uuid: _Optional[str] = ..., torch_version: _Optional[str] = ..., mem_handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class Handle(_message.Message):
    __slots__ = ("instance_id", "server_pid", "segment_id", "segment_generation", "byte_offset", "nbytes", "epoch", "host", "cuda")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_PID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_GENERATION_FIELD_NUMBER: _ClassVar[int]
    BYTE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    server_pid: int
    segment_id: int
    segment_generation: int
    byte_offset: int
    nbytes: int
    epoch: int
    host: HostSegmentHandle
    cuda: CudaSegmentHandle
    def __init__(self, instance_id: _Optional[str] = ..., server_pid: _Optional[int] = ..., segment_id: _Optional[int] = ..., segment_generation: _Optional[int] = ..., byte_offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., epoch: _Optional[int] = ..., host: _Optional[_Union[HostSegmentHandle, _Mapping]] = ..., cuda: _Optional[_Union[CudaSegmentHandle, _Mapping]] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("pool", "model_name", "cache_id", "size_bytes", "dtype", "shape", "priority", "pinned", "retain", "device", "wait_timeout_ms")
    POOL_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    model_name: str
    cache_id: str
    size_bytes: int
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    priority: int
    pinned: bool
    retain: bool
    device: str
    wait_timeout_ms: int
    def __init__(self, pool: _Optional[str] = ..., model_name: _Optional[str] = ..., cache_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., priority: _Optional[int] = ..., pinned: _Optional[bool] = ..., retain: _Optional[bool] = ..., device: _Optional[str] = ..., wait_timeout_ms: _Optional[int] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("cache", "handle")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    cache: Cache
    handle: Handle
    def __init__(self, cache: _Optional[_Union[Cache, _Mapping]] = ..., handle: _Optional[_Union[Handle, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("cache_id", "force")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    force: bool
    def __init__(self, cache_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("freed",)
    FREED_FIELD_NUMBER: _ClassVar[int]
    freed: bool
    def __init__(self, freed: _Optional[bool] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("cache_id", "wait_timeout_ms")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    wait_timeout_ms: int
    def __init__(self, cache_id: _Optional[str] = ..., wait_timeout_ms: _Optional[int] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("cache", "handle")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    cache: Cache
    handle: Handle
    def __init__(self, cache: _Optional[_Union[Cache, _Mapping]] = ..., handle: _Optional[_Union[Handle, _Mapping]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("cache_id",)
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    def __init__(self, cache_id: _Optional[str] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("cache", "handle")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    cache: Cache
    handle: Handle
    def __init__(self, cache: _Optional[_Union[Cache, _Mapping]] = ..., handle: _Optional[_Union[Handle, _Mapping]] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("cache_id",)
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    def __init__(self, cache_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("cache",)
    CACHE_FIELD_NUMBER: _ClassVar[int]
    cache: Cache
    def __init__(self, cache: _Optional[_Union[Cache, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Usage(_message.Message):
    __slots__ = ("total_capacity_bytes", "total_allocated_bytes", "reserved_bytes", "pinned_bytes", "free_bytes", "largest_free_extent_bytes", "utilization_ratio", "fragmentation_ratio", "active_caches", "segments", "allocation_count", "eviction_count", "pending_caches", "pinned_caches", "idle_retained_caches", "fragmentation_within_segments_ratio", "fragmentation_across_segments_ratio")
    TOTAL_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_EXTENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CACHES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_COUNT_FIELD_NUMBER: _ClassVar[int]
    EVICTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    PENDING_CACHES_FIELD_NUMBER: _ClassVar[int]
    PINNED_CACHES_FIELD_NUMBER: _ClassVar[int]
    IDLE_RETAINED_CACHES_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_WITHIN_SEGMENTS_RATIO_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_ACROSS_SEGMENTS_RATIO_FIELD_NUMBER: _ClassVar[int]
    total_capacity_bytes: int
    total_allocated_bytes: int
    reserved_bytes: int
    pinned_bytes: int
    free_bytes: int
    largest_free_extent_bytes: int
    utilization_ratio: float
    fragmentation_ratio: float
    active_caches: int
    segments: int
    allocation_count: int
    eviction_count: int
    pending_caches: int
    pinned_caches: int
    idle_retained_caches: int
    fragmentation_within_segments_ratio: float
    fragmentation_across_segments_ratio: float
    def __init__(self, total_capacity_bytes: _Optional[int] = ..., total_allocated_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., pinned_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., largest_free_extent_bytes: _Optional[int] = ..., utilization_ratio: _Optional[float] = ..., fragmentation_ratio: _Optional[float] = ..., active_caches: _Optional[int] = ..., segments: _Optional[int] = ..., allocation_count: _Optional[int] = ..., eviction_count: _Optional[int] = ..., pending_caches: _Optional[int] = ..., pinned_caches: _Optional[int] = ..., idle_retained_caches: _Optional[int] = ..., fragmentation_within_segments_ratio: _Optional[float] = ..., fragmentation_across_segments_ratio: _Optional[float] = ...) -> None: ...

class DeviceStats(_message.Message):
    __slots__ = ("device", "usage")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    device: str
    usage: Usage
    def __init__(self, device: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("pool", "usage", "min_bytes", "max_bytes", "priority", "eviction_policy", "waiting_allocations", "allocation_waits", "offloaded_host_bytes", "offloaded_disk_bytes")
    POOL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EVICTION_POLICY_FIELD_NUMBER: _ClassVar[int]
    WAITING_ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_WAITS_FIELD_NUMBER: _ClassVar[int]
    OFFLOADED_HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFLOADED_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    pool: str
    usage: Usage
    min_bytes: int
    max_bytes: int
    priority: int
    eviction_policy: str
    waiting_allocations: int
    allocation_waits: int
    offloaded_host_bytes: int
    offloaded_disk_bytes: int
    def __init__(self, pool: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., min_bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., priority: _Optional[int] = ..., eviction_policy: _Optional[str] = ..., waiting_allocations: _Optional[int] = ..., allocation_waits: _Optional[int] = ..., offloaded_host_bytes: _Optional[int] = ..., offloaded_disk_bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("total_capacity_bytes", "total_allocated_bytes", "utilization_ratio", "fragmentation_ratio", "active_caches", "allocation_count", "eviction_count", "devices", "pools", "pinned_bytes", "free_bytes", "largest_free_extent_bytes", "version", "instance_id", "uptime_seconds", "methods", "window_seconds", "sessions", "recent_errors", "errors_total", "paged_pools")
    TOTAL_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CACHES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_COUNT_FIELD_NUMBER: _ClassVar[int]
    EVICTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_EXTENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGED_POOLS_FIELD_NUMBER: _ClassVar[int]
    total_capacity_bytes: int
    total_allocated_bytes: int
    utilization_ratio: float
    fragmentation_ratio: float
    active_caches: int
    allocation_count: int
    eviction_count: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStats]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStats]
    pinned_bytes: int
    free_bytes: int
    largest_free_extent_bytes: int
    version: str
    instance_id: str
    uptime_seconds: float
    methods: _containers.RepeatedCompositeFieldContainer[MethodStats]
    window_seconds: float
    sessions: int
    recent_errors: _containers.RepeatedCompositeFieldContainer[RecentError]
    errors_total: int
    paged_pools: _containers.RepeatedCompositeFieldContainer[PagedPoolStats]
    def __init__(self, total_capacity_bytes: _Optional[int] = ..., total_allocated_bytes: _Optional[int] = ..., utilization_ratio: _Optional[float] = ..., fragmentation_ratio: _Optional[float] = ..., active_caches: _Optional[int] = ..., allocation_count: _Optional[int] = ..., eviction_count: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceStats, _Mapping]]] = ..., pools: _Optional[_Iterable[_Union[PoolStats, _Mapping]]] = ..., pinned_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., largest_free_extent_bytes: _Optional[int] = ..., version: _Optional[str] = ..., instance_id: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., methods: _Optional[_Iterable[_Union[MethodStats, _Mapping]]] = ..., window_seconds: _Optional[float] = ..., sessions: _Optional[int] = ..., recent_errors: _Optional[_Iterable[_Union[RecentError, _Mapping]]] = ..., errors_total: _Optional[int] = ..., paged_pools: _Optional[_Iterable[_Union[PagedPoolStats, _Mapping]]] = ...) -> None: ...

class MethodStats(_message.Message):
    __slots__ = ("method", "calls", "errors", "p50_seconds", "p95_seconds", "p99_seconds", "errors_by_code", "calls_total")
    class ErrorsByCodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P95_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_BY_CODE_FIELD_NUMBER: _ClassVar[int]
    CALLS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    method: str
    calls: int
    errors: int
    p50_seconds: float
    p95_seconds: float
    p99_seconds: float
    errors_by_code: _containers.ScalarMap[str, int]
    calls_total: int
    def __init__(self, method: _Optional[str] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., p50_seconds: _Optional[float] = ..., p95_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ..., errors_by_code: _Optional[_Mapping[str, int]] = ..., calls_total: _Optional[int] = ...) -> None: ...

class ListCachesRequest(_message.Message):
    __slots__ = ("pool", "model_name", "state", "page_size", "page_token")
    POOL_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pool: str
    model_name: str
    state: CacheState
    page_size: int
    page_token: str
    def __init__(self, pool: _Optional[str] = ..., model_name: _Optional[str] = ..., state: _Optional[_Union[CacheState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCachesResponse(_message.Message):
    __slots__ = ("caches", "next_page_token")
    CACHES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    caches: _containers.RepeatedCompositeFieldContainer[Cache]
    next_page_token: str
    def __init__(self, caches: _Optional[_Iterable[_Union[Cache, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DefragmentRequest(_message.Message):
    __slots__ = ("device", "pool", "dry_run", "target_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    TARGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    pool: str
    dry_run: bool
    target_bytes: int
    def __init__(self, device: _Optional[str] = ..., pool: _Optional[str] = ..., dry_run: _Optional[bool] = ..., target_bytes: _Optional[int] = ...) -> None: ...

class PlannedMove(_message.Message):
    __slots__ = ("cache_id", "pool", "device", "nbytes", "from_segment_id", "from_offset", "to_segment_id", "to_offset")
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    FROM_SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TO_SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_OFFSET_FIELD_NUMBER: _ClassVar[int]
    cache_id: str
    pool: str
    device: str
    nbytes: int
    from_segment_id: int
    from_offset: int
    to_segment_id: int
    to_offset: int
    def __init__(self, cache_id: _Optional[str] = ..., pool: _Optional[str] = ..., device: _Optional[str] = ..., nbytes: _Optional[int] = ..., from_segment_id: _Optional[int] = ..., from_offset: _Optional[int] = ..., to_segment_id: _Optional[int] = ..., to_offset: _Optional[int] = ...) -> None: ...

class DefragmentResponse(_message.Message):
    __slots__ = ("caches_moved", "bytes_moved", "fragmentation_before", "fragmentation_after", "segments_freed", "duration_seconds", "dry_run", "fragmentation_within_segments_before", "fragmentation_within_segments_after", "fragmentation_across_segments_before", "fragmentation_across_segments_after", "free_bytes_in_segments", "largest_free_extent_before_bytes", "largest_free_extent_after_bytes", "segments_freed_bytes", "moves", "moves_total", "paged", "block_moves")
    CACHES_MOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_BEFORE_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_AFTER_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FREED_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_WITHIN_SEGMENTS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_WITHIN_SEGMENTS_AFTER_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_ACROSS_SEGMENTS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_ACROSS_SEGMENTS_AFTER_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_IN_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_EXTENT_BEFORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_EXTENT_AFTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    MOVES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_MOVES_FIELD_NUMBER: _ClassVar[int]
    caches_moved: int
    bytes_moved: int
    fragmentation_before: float
    fragmentation_after: float
    segments_freed: int
    duration_seconds: float
    dry_run: bool
    fragmentation_within_segments_before: float
    fragmentation_within_segments_after: float
    fragmentation_across_segments_before: float
    fragmentation_across_segments_after: float
    free_bytes_in_segments: int
    largest_free_extent_before_bytes: int
    largest_free_extent_after_bytes: int
    segments_freed_bytes: int
    moves: _containers.RepeatedCompositeFieldContainer[PlannedMove]
    moves_total: int
    paged: bool
    block_moves: _containers.RepeatedCompositeFieldContainer[PagedBlockMove]
    def __init__(self, caches_moved: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., fragmentation_before: _Optional[float] = ..., fragmentation_after: _Optional[float] = ..., segments_freed: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., dry_run: _Optional[bool] = ..., fragmentation_within_segments_before: _Optional[float] = ..., fragmentation_within_segments_after: _Optional[float] = ..., fragmentation_across_segments_before: _Optional[float] = ..., fragmentation_across_segments_after: _Optional[float] = ..., free_bytes_in_segments: _Optional[int] = ..., largest_free_extent_before_bytes: _Optional[int] = ..., largest_free_extent_after_bytes: _Optional[int] = ..., segments_freed_bytes: _Optional[int] = ..., moves: _Optional[_Iterable[_Union[PlannedMove, _Mapping]]] = ..., moves_total: _Optional[int] = ..., paged: _Optional[bool] = ..., block_moves: _Optional[_Iterable[_Union[PagedBlockMove, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("session_id", "client_name", "pid", "host")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client_name: str
    pid: int
    host: str
    def __init__(self, session_id: _Optional[str] = ..., client_name: _Optional[str] = ..., pid: _Optional[int] = ..., host: _Optional[str] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("kind", "cache_id", "epoch", "segment_id", "segment_generation", "reason", "session_id", "lease_seconds", "instance_id", "session_secret", "sequence_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    kind: EventKind
    cache_id: str
    epoch: int
    segment_id: int
    segment_generation: int
    reason: str
    session_id: str
    lease_seconds: float
    instance_id: str
    session_secret: str
    sequence_id: str
    def __init__(self, kind: _Optional[_Union[EventKind, str]] = ..., cache_id: _Optional[str] = ..., epoch: _Optional[int] = ..., segment_id: _Optional[int] = ..., segment_generation: _Optional[int] = ..., reason: _Optional[str] = ..., session_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., instance_id: _Optional[str] = ..., session_secret: _Optional[str] = ..., sequence_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_seconds",)
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    def __init__(self, lease_seconds: _Optional[float] = ...) -> None: ...

class ReportUnmappedRequest(_message.Message):
    __slots__ = ("segment_id", "segment_generation")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_GENERATION_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    segment_generation: int
    def __init__(self, segment_id: _Optional[int] = ..., segment_generation: _Optional[int] = ...) -> None: ...

class ReportUnmappedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "principal", "client_name", "pid", "host", "peer_known", "peer_uid", "peer_pid", "age_seconds", "lease_remaining_seconds", "watching", "holds", "pins", "mapped_segments")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PEER_KNOWN_FIELD_NUMBER: _ClassVar[int]
    PEER_UID_FIELD_NUMBER: _ClassVar[int]
    PEER_PID_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WATCHING_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    MAPPED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    principal: str
    client_name: str
    pid: int
    host: str
    peer_known: bool
    peer_uid: int
    peer_pid: int
    age_seconds: float
    lease_remaining_seconds: float
    watching: bool
    holds: int
    pins: int
    mapped_segments: int
    def __init__(self, session_id: _Optional[str] = ..., principal: _Optional[str] = ..., client_name: _Optional[str] = ..., pid: _Optional[int] = ..., host: _Optional[str] = ..., peer_known: _Optional[bool] = ..., peer_uid: _Optional[int] = ..., peer_pid: _Optional[int] = ..., age_seconds: _Optional[float] = ..., lease_remaining_seconds: _Optional[float] = ..., watching: _Optional[bool] = ..., holds: _Optional[int] = ..., pins: _Optional[int] = ..., mapped_segments: _Optional[int] = ...) -> None: ...

class SessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("pool", "idle_only", "device")
    POOL_FIELD_NUMBER: _ClassVar[int]
    IDLE_ONLY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    pool: str
    idle_only: bool
    device: str
    def __init__(self, pool: _Optional[str] = ..., idle_only: _Optional[bool] = ..., device: _Optional[str] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("caches_evicted", "bytes_evicted", "cache_ids", "caches_kept")
    CACHES_EVICTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_EVICTED_FIELD_NUMBER: _ClassVar[int]
    CACHE_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHES_KEPT_FIELD_NUMBER: _ClassVar[int]
    caches_evicted: int
    bytes_evicted: int
    cache_ids: _containers.RepeatedScalarFieldContainer[str]
    caches_kept: int
    def __init__(self, caches_evicted: _Optional[int] = ..., bytes_evicted: _Optional[int] = ..., cache_ids: _Optional[_Iterable[str]] = ..., caches_kept: _Optional[int] = ...) -> None: ...

class SetPoolLimitsRequest(_message.Message):
    __slots__ = ("pool", "max_bytes", "min_bytes", "priority", "dry_run")
    POOL_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    pool: str
    max_bytes: int
    min_bytes: int
    priority: int
    dry_run: bool
    def __init__(self, pool: _Optional[str] = ..., max_bytes: _Optional[int] = ..., min_bytes: _Optional[int] = ..., priority: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class PoolLimits(_message.Message):
    __slots__ = ("max_bytes", "min_bytes", "priority")
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    max_bytes: int
    min_bytes: int
    priority: int
    def __init__(self, max_bytes: _Optional[int] = ..., min_bytes: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class SetPoolLimitsResponse(_message.Message):
    __slots__ = ("pool", "before", "after", "caches_evicted", "bytes_evicted", "cache_ids", "segments_retired", "bytes_retired", "segments_draining", "bytes_draining", "dry_run")
    POOL_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    CACHES_EVICTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_EVICTED_FIELD_NUMBER: _ClassVar[int]
    CACHE_IDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_RETIRED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RETIRED_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_DRAINING_FIELD_NUMBER: _ClassVar[int]
    BYTES_DRAINING_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    pool: str
    before: PoolLimits
    after: PoolLimits
    caches_evicted: int
    bytes_evicted: int
    cache_ids: _containers.RepeatedScalarFieldContainer[str]
    segments_retired: int
    bytes_retired: int
    segments_draining: int
    bytes_draining: int
    dry_run: bool
    def __init__(self, pool: _Optional[str] = ..., before: _Optional[_Union[PoolLimits, _Mapping]] = ..., after: _Optional[_Union[PoolLimits, _Mapping]] = ..., caches_evicted: _Optional[int] = ..., bytes_evicted: _Optional[int] = ..., cache_ids: _Optional[_Iterable[str]] = ..., segments_retired: _Optional[int] = ..., bytes_retired: _Optional[int] = ..., segments_draining: _Optional[int] = ..., bytes_draining: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("generation", "caches", "skipped", "written_bytes", "duration_seconds", "directory")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CACHES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    generation: int
    caches: int
    skipped: int
    written_bytes: int
    duration_seconds: float
    directory: str
    def __init__(self, generation: _Optional[int] = ..., caches: _Optional[int] = ..., skipped: _Optional[int] = ..., written_bytes: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., directory: _Optional[str] = ...) -> None: ...

class EndSessionsRequest(_message.Message):
    __slots__ = ("older_than_seconds", "session_ids", "dry_run")
    OLDER_THAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    older_than_seconds: float
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    def __init__(self, older_than_seconds: _Optional[float] = ..., session_ids: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class EndSessionsResponse(_message.Message):
    __slots__ = ("sessions", "caches_freed", "dry_run")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHES_FREED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    caches_freed: int
    dry_run: bool
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., caches_freed: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RecentError(_message.Message):
    __slots__ = ("time", "method", "code", "message")
    TIME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    method: str
    code: str
    message: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., method: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype", "block_tokens", "bytes_per_token", "bytes_per_block")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: Dtype
    block_tokens: int
    bytes_per_token: int
    bytes_per_block: int
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., block_tokens: _Optional[int] = ..., bytes_per_token: _Optional[int] = ..., bytes_per_block: _Optional[int] = ...) -> None: ...

class OpenPagedPoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class OpenPagedPoolResponse(_message.Message):
    __slots__ = ("pool", "layout", "num_blocks", "layer_bytes", "arena", "handle")
    POOL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARENA_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    pool: str
    layout: KvLayout
    num_blocks: int
    layer_bytes: int
    arena: Cache
    handle: Handle
    def __init__(self, pool: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., num_blocks: _Optional[int] = ..., layer_bytes: _Optional[int] = ..., arena: _Optional[_Union[Cache, _Mapping]] = ..., handle: _Optional[_Union[Handle, _Mapping]] = ...) -> None: ...

class BlockRun(_message.Message):
    __slots__ = ("first_block", "count")
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    first_block: int
    count: int
    def __init__(self, first_block: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("sequence_id", "pool", "runs", "tokens_used", "tokens_reserved", "max_tokens", "priority", "pinned", "holder_count")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_RESERVED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    HOLDER_COUNT_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    pool: str
    runs: _containers.RepeatedCompositeFieldContainer[BlockRun]
    tokens_used: int
    tokens_reserved: int
    max_tokens: int
    priority: int
    pinned: bool
    holder_count: int
    def __init__(self, sequence_id: _Optional[str] = ..., pool: _Optional[str] = ..., runs: _Optional[_Iterable[_Union[BlockRun, _Mapping]]] = ..., tokens_used: _Optional[int] = ..., tokens_reserved: _Optional[int] = ..., max_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., pinned: _Optional[bool] = ..., holder_count: _Optional[int] = ...) -> None: ...

class AllocateSequenceRequest(_message.Message):
    __slots__ = ("pool", "sequence_id", "prompt_tokens", "max_tokens", "tokens_wanted", "priority", "pinned", "on_oom", "wait_timeout_ms")
    POOL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_WANTED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    ON_OOM_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    sequence_id: str
    prompt_tokens: int
    max_tokens: int
    tokens_wanted: int
    priority: int
    pinned: bool
    on_oom: OomStrategy
    wait_timeout_ms: int
    def __init__(self, pool: _Optional[str] = ..., sequence_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., tokens_wanted: _Optional[int] = ..., priority: _Optional[int] = ..., pinned: _Optional[bool] = ..., on_oom: _Optional[_Union[OomStrategy, str]] = ..., wait_timeout_ms: _Optional[int] = ...) -> None: ...

class SequenceResponse(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: Sequence
    def __init__(self, sequence: _Optional[_Union[Sequence, _Mapping]] = ...) -> None: ...

class ExtendSequenceRequest(_message.Message):
    __slots__ = ("pool", "sequence_id", "tokens_used", "tokens_needed", "tokens_wanted")
    POOL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_WANTED_FIELD_NUMBER: _ClassVar[int]
    pool: str
    sequence_id: str
    tokens_used: int
    tokens_needed: int
    tokens_wanted: int
    def __init__(self, pool: _Optional[str] = ..., sequence_id: _Optional[str] = ..., tokens_used: _Optional[int] = ..., tokens_needed: _Optional[int] = ..., tokens_wanted: _Optional[int] = ...) -> None: ...

class FreeSequenceRequest(_message.Message):
    __slots__ = ("pool", "sequence_id")
    POOL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    pool: str
    sequence_id: str
    def __init__(self, pool: _Optional[str] = ..., sequence_id: _Optional[str] = ...) -> None: ...

class FreeSequenceResponse(_message.Message):
    __slots__ = ("freed",)
    FREED_FIELD_NUMBER: _ClassVar[int]
    freed: bool
    def __init__(self, freed: _Optional[bool] = ...) -> None: ...

class AttachSequenceRequest(_message.Message):
    __slots__ = ("pool", "sequence_id")
    POOL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    pool: str
    sequence_id: str
    def __init__(self, pool: _Optional[str] = ..., sequence_id: _Optional[str] = ...) -> None: ...

class PinSequenceRequest(_message.Message):
    __slots__ = ("pool", "sequence_id", "pinned")
    POOL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    pool: str
    sequence_id: str
    pinned: bool
    def __init__(self, pool: _Optional[str] = ..., sequence_id: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class BlockMapRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class PagedPoolStats(_message.Message):
    __slots__ = ("pool", "layout", "num_blocks", "blocks_used", "blocks_free", "sequences", "free_runs", "largest_free_run", "fragmentation", "tokens_used", "tokens_reserved", "tokens_free", "pinned_sequences")
    POOL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    FREE_RUNS_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_RUN_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_RESERVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FREE_FIELD_NUMBER: _ClassVar[int]
    PINNED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    pool: str
    layout: KvLayout
    num_blocks: int
    blocks_used: int
    blocks_free: int
    sequences: int
    free_runs: int
    largest_free_run: int
    fragmentation: float
    tokens_used: int
    tokens_reserved: int
    tokens_free: int
    pinned_sequences: int
    def __init__(self, pool: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., num_blocks: _Optional[int] = ..., blocks_used: _Optional[int] = ..., blocks_free: _Optional[int] = ..., sequences: _Optional[int] = ..., free_runs: _Optional[int] = ..., largest_free_run: _Optional[int] = ..., fragmentation: _Optional[float] = ..., tokens_used: _Optional[int] = ..., tokens_reserved: _Optional[int] = ..., tokens_free: _Optional[int] = ..., pinned_sequences: _Optional[int] = ...) -> None: ...

class BlockMapResponse(_message.Message):
    __slots__ = ("stats", "block_map", "sequences")
    STATS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_MAP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    stats: PagedPoolStats
    block_map: str
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    def __init__(self, stats: _Optional[_Union[PagedPoolStats, _Mapping]] = ..., block_map: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ...) -> None: ...

class PagedBlockMove(_message.Message):
    __slots__ = ("sequence_id", "from_block", "to_block")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TO_BLOCK_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    from_block: int
    to_block: int
    def __init__(self, sequence_id: _Optional[str] = ..., from_block: _Optional[int] = ..., to_block: _Optional[int] = ...) -> None: ...
