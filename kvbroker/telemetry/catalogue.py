"""The one catalogue of every metric kvbroker exports, for Prometheus and OTLP alike.

Each ``MetricSpec`` names a metric the Prometheus way (``kvbroker_`` prefix, base units,
the unit as a suffix, ``_total`` on counters, ``_ratio`` for 0..1, no colons) and gives
its kind, unit, help and labels. Both exporters, the docs table (``docs/metrics.md``)
and the tests read this tuple; nothing else defines a metric. ``otel_name`` and
``otel_unit`` derive the OTLP form so that the OpenTelemetry-to-Prometheus translation
(unit ``By`` -> ``_bytes``, ``s`` -> ``_seconds``, ``1`` on a gauge -> ``_ratio``,
monotonic sums -> ``_total``, dots -> underscores) gives back ``name`` exactly.

Labels are bounded: devices, pools and their policies come from the configuration,
methods and codes from the proto, outcomes, reasons and states from fixed sets. A cache
id or a session id is never a label.

Counters whose label values are known in advance (every configured pool and arena with
every outcome and eviction reason, every session-end reason, every CacheBroker method
with every error code the broker answers) are exported at 0 from the start, so a
dashboard's panels show 0 rather than no data; other series appear with their first
event.

Invariant: ``CATALOGUE`` names are unique and obey ``naming_problems`` (checked by the
tests). Cost: none at run time beyond building the tuple at import.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvbroker.wire import SessionEndReason

PREFIX = "kvbroker_"


class Kind(enum.Enum):
    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    INFO = "info"


#: Prometheus unit suffix -> UCUM unit for OTLP ("" : a plain count, no unit).
_OTEL_UNITS = {"bytes": "By", "seconds": "s", "ratio": "1", "": ""}

#: Histogram bucket upper bounds, in seconds. RPCs take 0.3-2 ms on the Unix socket and
#: up to a wait timeout when queued; compaction copies take milliseconds to seconds.
RPC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Checkpoints write whole pools: milliseconds for a few MiB to minutes for many GiB.
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COMPACTION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its Prometheus name, kind, unit, help text and label names.

    ``unit`` is the Prometheus unit suffix (``bytes``, ``seconds``, ``ratio``) or ``""``
    for a count; ``buckets`` are a histogram's upper bounds.
    """

    name: str
    kind: Kind
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def base_name(self) -> str:
        """The name without ``_total`` (what prometheus_client's families take apart)."""
        return self.name.removesuffix("_total") if self.kind is Kind.COUNTER else self.name

    @property
    def otel_name(self) -> str:
        """The OTLP name: ``kvbroker.<namespace>.<rest>`` without unit or ``_total``
        (``kvbroker_device_free_bytes`` -> ``kvbroker.device.free``)."""
        stem = self.base_name
        if self.unit:
            stem = stem.removesuffix("_" + self.unit)
        rest = stem.removeprefix(PREFIX)
        return "kvbroker." + rest.replace("_", ".", 1)

    @property
    def otel_unit(self) -> str:
        return _OTEL_UNITS[self.unit]


def _usage_gauges(scope: str) -> list[MetricSpec]:
    """The figures of a ``Usage`` snapshot, per device or per pool (read at scrape time)."""
    of = "the device" if scope == "device" else "the pool"
    capacity = "capacity" if scope == "device" else "quota (max_bytes, at most its devices' capacity)"
    rows = [
        ("capacity_bytes", "bytes", f"Bytes {of} may hold: its {capacity}."),
        ("reserved_bytes", "bytes", f"Bytes of {of}'s segments (allocated + free inside segments)."),
        ("allocated_bytes", "bytes", f"Bytes of resident caches on {of} (block-rounded)."),
        ("pinned_bytes", "bytes", f"Bytes of pinned caches on {of} (never evicted or moved)."),
        ("free_bytes", "bytes", f"Bytes {of} could still place: capacity minus allocated."),
        ("largest_free_extent_bytes", "bytes",
         f"Largest contiguous free range of {of}: inside a segment or as a new segment."),
        ("fragmentation_ratio", "ratio",
         f"1 - largest free extent / free bytes, over the free space inside {of}'s segments."),
        ("fragmentation_within_segments_ratio", "ratio",
         f"Share of the free bytes inside {of}'s segments outside their own segment's largest free "
         "range: what a compaction merges (fragmentation_ratio = within + across)."),
        ("fragmentation_across_segments_ratio", "ratio",
         f"Share of the free bytes inside {of}'s segments in other segments' largest free ranges: "
         "split across segments, which no move merges (only segments going back to the device do)."),
        ("utilization_ratio", "ratio", f"Allocated / capacity of {of}."),
        ("caches", "", f"Live caches on {of}: resident, and pending (being backed)."),
        ("segments", "", f"Segments (device allocations) of {of}."),
    ]  # fmt: skip
    return [MetricSpec(f"{PREFIX}{scope}_{q}", Kind.GAUGE, unit, text, (scope,)) for q, unit, text in rows]


CATALOGUE: tuple[MetricSpec, ...] = (
    *_usage_gauges("device"),
    *_usage_gauges("pool"),
    MetricSpec("kvbroker_pool_min_bytes", Kind.GAUGE, "bytes",
               "Bytes guaranteed to the pool: other pools may not take it below this.", ("pool",)),
    MetricSpec("kvbroker_pool_priority", Kind.GAUGE, "",
               "The pool's priority: its caches' default, and the order in which pools give "
               "memory up (lowest first).", ("pool",)),
    MetricSpec("kvbroker_pool_caches_by_state", Kind.GAUGE, "",
               "Live caches of the pool by state: resident and pending (being backed) add up "
               "to every live cache; pinned (never evicted or moved) and idle_retained (retained, "
               "resident, held by nobody: the first to go under pressure) are subsets of them.",
               ("pool", "state")),
    MetricSpec("kvbroker_pool_waiting_allocations", Kind.GAUGE, "",
               "Allocate requests queued for room in the pool now (wait_timeout_ms).", ("pool",)),
    MetricSpec("kvbroker_paged_pool_blocks", Kind.GAUGE, "",
               "Blocks of a paged pool's arena (pools with [pools.kv]) by state: used (granted to "
               "sequences) or free.", ("pool", "state")),
    MetricSpec("kvbroker_paged_pool_tokens", Kind.GAUGE, "",
               "Token slots of a paged pool by state: used (as workers last reported), reserved "
               "(granted blocks' slots, used included) or free (free blocks' slots).", ("pool", "state")),
    MetricSpec("kvbroker_paged_pool_sequences", Kind.GAUGE, "", "Sequences holding blocks of a paged pool.", ("pool",)),
    MetricSpec("kvbroker_paged_pool_fragmentation_ratio", Kind.GAUGE, "ratio",
               "1 - the largest run of free blocks / the free blocks of a paged pool (0: one run).", ("pool",)),
    MetricSpec("kvbroker_sessions_active", Kind.GAUGE, "",
               "Live client sessions (with a Watch stream, or lease-only)."),
    # Cumulative counts kept by the core, per arena (pool x device), read at scrape time.
    MetricSpec("kvbroker_evictions_total", Kind.COUNTER, "",
               "Caches evicted, by the pool's eviction policy and the reason "
               "(idle, policy, reclaim, threshold, operator).", ("pool", "device", "policy", "reason")),
    MetricSpec("kvbroker_evicted_bytes_total", Kind.COUNTER, "bytes",
               "Bytes of the caches evicted (block-rounded), by policy and reason.",
               ("pool", "device", "policy", "reason")),
    MetricSpec("kvbroker_releases_total", Kind.COUNTER, "",
               "Caches freed because their last holder released them (or by force).", ("pool", "device")),
    MetricSpec("kvbroker_compactions_total", Kind.COUNTER, "",
               "Compactions that moved caches of the pool on the device.", ("pool", "device")),
    MetricSpec("kvbroker_compaction_moved_bytes_total", Kind.COUNTER, "bytes",
               "Bytes copied by compactions.", ("pool", "device")),
    # Counted by the engine's and the server's hooks.
    MetricSpec("kvbroker_allocations_total", Kind.COUNTER, "",
               "Allocate requests by outcome (ok, exhausted, timeout, invalid, not_found, "
               "already_exists, failed_precondition, cancelled, error); pool is empty for a "
               "request naming no configured pool.", ("pool", "outcome")),
    MetricSpec("kvbroker_allocation_wait_seconds", Kind.HISTOGRAM, "seconds",
               "Time Allocate requests spent queued for room (wait_timeout_ms), whatever "
               "the outcome; requests served at once are not counted.", ("pool",), WAIT_BUCKETS),
    MetricSpec("kvbroker_compaction_duration_seconds", Kind.HISTOGRAM, "seconds",
               "Time one compaction spent copying bytes on a device.", ("device",), COMPACTION_BUCKETS),
    MetricSpec("kvbroker_sessions_opened_total", Kind.COUNTER, "", "Client sessions opened."),
    MetricSpec("kvbroker_sessions_reclaimed_total", Kind.COUNTER, "",
               "Client sessions ended by the broker, by reason "
               f"({', '.join(r.value for r in SessionEndReason)}, other).",
               ("reason",)),
    MetricSpec("kvbroker_rpc_duration_seconds", Kind.HISTOGRAM, "seconds",
               "Server-side duration of RPCs by service, method and status code.",
               ("service", "method", "code"), RPC_BUCKETS),
    MetricSpec("kvbroker_rpc_errors_total", Kind.COUNTER, "",
               "RPCs that ended with a status other than OK, by service, method and code.",
               ("service", "method", "code")),
    # Persistence (issue 13): checkpoints of persistent pools and their restore at start.
    MetricSpec("kvbroker_checkpoints_total", Kind.COUNTER, "",
               "Checkpoints by outcome: ok, budget_exceeded (persistence.max_bytes), disk_full, "
               "error; a failed one leaves the previous generation current.", ("outcome",)),
    MetricSpec("kvbroker_checkpoint_written_bytes_total", Kind.COUNTER, "bytes",
               "Bytes of cache files written by published checkpoints."),
    MetricSpec("kvbroker_checkpoint_duration_seconds", Kind.HISTOGRAM, "seconds",
               "Time one checkpoint took, whatever its outcome.", (), CHECKPOINT_BUCKETS),
    MetricSpec("kvbroker_checkpoint_generations_rejected_total", Kind.COUNTER, "",
               "Checkpoint generations not loaded at start because a manifest or file failed its "
               "size, digest or binding check (the previous generation is tried next)."),
    MetricSpec("kvbroker_restored_caches_total", Kind.COUNTER, "",
               "Caches restored from a checkpoint at start."),
    # The offload tier (issue 13): caches offloaded instead of evicted, and their restores.
    MetricSpec("kvbroker_offloaded_bytes", Kind.GAUGE, "bytes",
               "Bytes of offloaded caches an offload tier (host, disk) holds now, by pool and tier.",
               ("pool", "tier")),
    MetricSpec("kvbroker_offloads_total", Kind.COUNTER, "",
               "Copy-outs to an offload tier by pool, tier and outcome: ok, freed (released while "
               "copied), failed (the cache was evicted).", ("pool", "tier", "outcome")),
    MetricSpec("kvbroker_restores_total", Kind.COUNTER, "",
               "Restores of offloaded caches by pool, tier and outcome: ok, failed (no room, or "
               "the copy-in failed: still offloaded), corrupt (the copy failed its checks: evicted).",
               ("pool", "tier", "outcome")),
    MetricSpec("kvbroker_restore_duration_seconds", Kind.HISTOGRAM, "seconds",
               "Time one restore took (placement, waits and the copy-in), by pool and tier.",
               ("pool", "tier"), WAIT_BUCKETS),
    MetricSpec("kvbroker_build_info", Kind.INFO, "",
               "Always 1; the labels give the running kvbroker version and Python version.",
               ("version", "python")),
)  # fmt: skip

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOGUE}

#: Labels a metric may carry (bounded sets; see the module docstring).
ALLOWED_LABELS = frozenset(
    {"device", "pool", "policy", "reason", "outcome", "service", "method", "code", "version", "python", "state",
     "tier"}
)


def naming_problems(spec: MetricSpec) -> list[str]:
    """What ``spec`` breaks of the Prometheus naming rules (empty when it is well named)."""
    problems = []
    name = spec.name
    if not name.startswith(PREFIX) or ":" in name or not name.replace("_", "").isalnum() or name != name.lower():
        problems.append("names are kvbroker_ plus lower-case words joined by _")
    if spec.kind is Kind.COUNTER and not name.endswith("_total"):
        problems.append("a counter ends in _total")
    if spec.kind is not Kind.COUNTER and name.endswith("_total"):
        problems.append("only counters end in _total")
    if spec.kind is Kind.INFO and not name.endswith("_info"):
        problems.append("an info metric ends in _info")
    if spec.unit not in _OTEL_UNITS:
        problems.append(f"unit {spec.unit!r} is not a base unit (bytes, seconds, ratio)")
    elif spec.unit and not spec.base_name.endswith("_" + spec.unit):
        problems.append(f"the unit {spec.unit} is the name's suffix")
    for unit in ("_bytes", "_seconds", "_ratio"):
        if not spec.unit and spec.base_name.endswith(unit):
            problems.append(f"a name ending in {unit} declares that unit")
    if spec.kind is Kind.HISTOGRAM and (not spec.buckets or list(spec.buckets) != sorted(set(spec.buckets))):
        problems.append("a histogram has increasing buckets")
    bad = set(spec.labels) - ALLOWED_LABELS
    if bad:
        problems.append(f"labels {sorted(bad)} are not among the bounded labels")
    if not spec.help or not spec.help.endswith("."):
        problems.append("help is a sentence")
    return problems


def reference_table() -> str:
    """The metrics reference table of ``docs/metrics.md`` (markdown), in catalogue order;
    ``scripts/gen_metrics_doc.py`` writes it and a test checks it."""
    rows = ["| name | type | unit | labels | meaning |", "|---|---|---|---|---|"]
    for spec in CATALOGUE:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        rows.append(f"| `{spec.name}` | {spec.kind.value} | {spec.unit or '-'} | {labels} | {spec.help} |")
    return "\n".join(rows) + "\n"
