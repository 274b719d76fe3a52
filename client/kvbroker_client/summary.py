"""The broker's Stats as the kvcached guide's ``get_pool_statistics()`` reports them.

Workers and dashboards written against that guide (README, "Coming from the kvcached
guide", has the correspondence) read a dict of keys such as
``total_capacity_gb``, ``total_utilization_pct``, ``avg_fragmentation_pct`` and
``device_stats``. ``summarize`` builds that dict from a ``StatsResponse`` (a protobuf
message, which cannot grow methods), in the guide's units: ``_gb`` figures are GiB
(2**30 bytes, as the guide computes them), ``_pct`` figures are percentages (0-100).
``BrokerClient.summary()`` is ``summarize(client.stats())``.

Keys (every figure is the broker's, ``kvbroker/core/stats.py`` defines them):

- ``total_capacity_gb``, ``total_allocated_gb``, ``total_free_gb``, ``total_pinned_gb``,
  ``largest_free_extent_gb``: all devices together.
- ``total_utilization_pct``: allocated / capacity.
- ``avg_fragmentation_pct``: the mean over devices of each device's fragmentation
  (``1 - largest free range / free bytes`` inside its segments).
- ``total_active_caches``, ``total_allocation_count``, ``total_eviction_count``,
  ``num_devices``.
- ``device_stats``: per device id (``"host"`` or a GPU UUID): ``capacity_gb``,
  ``allocated_gb``, ``utilization_pct``, ``fragmentation_pct``, ``active_caches``.
- ``pool_stats``: per pool: the same five (a pool's capacity is its ``max_bytes``), and
  ``min_gb``, ``max_gb``, ``priority``, ``eviction_policy``, ``allocation_count``,
  ``eviction_count``.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from kvbroker.v1 import broker_pb2 as pb

__all__ = ["summarize"]

_GiB = float(1 << 30)


def _usage(usage: pb.Usage) -> dict[str, Any]:
    return {
        "capacity_gb": usage.total_capacity_bytes / _GiB,
        "allocated_gb": usage.total_allocated_bytes / _GiB,
        "utilization_pct": usage.utilization_ratio * 100.0,
        "fragmentation_pct": usage.fragmentation_ratio * 100.0,
        "active_caches": usage.active_caches,
    }


def summarize(stats: pb.StatsResponse) -> dict[str, Any]:
    """The guide's statistics dict from a ``StatsResponse`` (see the module docstring)."""
    devices = {d.device: _usage(d.usage) for d in stats.devices}
    pools = {
        p.pool: {
            **_usage(p.usage), "min_gb": p.min_bytes / _GiB, "max_gb": p.max_bytes / _GiB, "priority": p.priority,
            "eviction_policy": p.eviction_policy, "allocation_count": p.usage.allocation_count,
            "eviction_count": p.usage.eviction_count,
        }
        for p in stats.pools
    }  # fmt: skip
    fragmentation = [d["fragmentation_pct"] for d in devices.values()]
    return {
        "total_capacity_gb": stats.total_capacity_bytes / _GiB,
        "total_allocated_gb": stats.total_allocated_bytes / _GiB,
        "total_free_gb": stats.free_bytes / _GiB,
        "total_pinned_gb": stats.pinned_bytes / _GiB,
        "largest_free_extent_gb": stats.largest_free_extent_bytes / _GiB,
        "total_utilization_pct": stats.utilization_ratio * 100.0,
        "avg_fragmentation_pct": sum(fragmentation) / len(fragmentation) if fragmentation else 0.0,
        "total_active_caches": stats.active_caches,
        "total_allocation_count": stats.allocation_count,
        "total_eviction_count": stats.eviction_count,
        "num_devices": len(devices),
        "device_stats": devices,
        "pool_stats": pools,
    }
