"""The read-only views: ``kvbroker stats``, ``sessions`` and ``defrag``'s report.

Pure functions from a response to text (``kvbroker ls`` is in ``kvbroker.cli.caches``,
the live view in ``kvbroker.cli.top``).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbroker.cli.formatting import format_bytes, format_duration, format_latency, format_ratio, format_time, render_table
from kvbroker.v1 import broker_pb2 as pb

_USAGE_HEADERS = ("SCOPE", "CAPACITY", "ALLOCATED", "FREE", "LARGEST FREE", "PINNED", "UTIL", "FRAG",
                  "CACHES", "ALLOCATIONS", "EVICTIONS")  # fmt: skip
_USAGE_ALIGN = "lrrrrrrrrrr"


def _usage_row(scope: str, u: pb.Usage) -> list[str]:
    return [
        scope, format_bytes(u.total_capacity_bytes), format_bytes(u.total_allocated_bytes),
        format_bytes(u.free_bytes), format_bytes(u.largest_free_extent_bytes), format_bytes(u.pinned_bytes),
        format_ratio(u.utilization_ratio), format_ratio(u.fragmentation_ratio),
        str(u.active_caches), str(u.allocation_count), str(u.eviction_count),
    ]  # fmt: skip


def total_usage(stats: pb.StatsResponse) -> pb.Usage:
    """The broker-wide figures of a Stats response, as a ``Usage`` like the others."""
    return pb.Usage(
        total_capacity_bytes=stats.total_capacity_bytes, total_allocated_bytes=stats.total_allocated_bytes,
        free_bytes=stats.free_bytes, largest_free_extent_bytes=stats.largest_free_extent_bytes,
        pinned_bytes=stats.pinned_bytes, utilization_ratio=stats.utilization_ratio,
        fragmentation_ratio=stats.fragmentation_ratio, active_caches=stats.active_caches,
        allocation_count=stats.allocation_count, eviction_count=stats.eviction_count,
    )  # fmt: skip


def render_stats(stats: pb.StatsResponse) -> str:
    """The ``kvbroker stats`` text: a header line, one usage table (the total, then each
    device, then each pool), the pools' limits, policies and waiting allocations, the
    fragmentation per device and pool split into what a compaction fixes (within
    segments) and what it cannot (across segments), and the recent RPC latencies."""
    rows = [_usage_row("total", total_usage(stats))]
    rows += [_usage_row(f"device {d.device}", d.usage) for d in stats.devices]
    rows += [_usage_row(f"pool {p.pool}", p.usage) for p in stats.pools]
    uptime = format_duration(stats.uptime_seconds)
    sessions = f"{stats.sessions} session" + ("" if stats.sessions == 1 else "s")
    header = f"kvbroker {stats.version or '?'}  instance {stats.instance_id or '?'}  up {uptime}  {sessions}"
    parts = [header, "", render_table(_USAGE_HEADERS, rows, _USAGE_ALIGN)]
    if stats.pools:
        pool_rows = [
            [p.pool, format_bytes(p.min_bytes), format_bytes(p.max_bytes) if p.max_bytes else "unlimited",
             str(p.priority), p.eviction_policy or "-", str(p.usage.pinned_caches),
             str(p.usage.idle_retained_caches), str(p.waiting_allocations), str(p.allocation_waits)]
            for p in stats.pools
        ]  # fmt: skip
        headers = ("POOL", "MIN", "MAX", "PRIORITY", "POLICY", "PINNED", "IDLE RETAINED", "WAITING", "WAITED")
        parts += ["", render_table(headers, pool_rows, "lrrrlrrrr")]
    split = [(f"device {d.device}", d.usage) for d in stats.devices] + [(f"pool {p.pool}", p.usage) for p in stats.pools]
    if split:
        frag_rows = [
            [scope, format_ratio(u.fragmentation_ratio), format_ratio(u.fragmentation_within_segments_ratio),
             format_ratio(u.fragmentation_across_segments_ratio)]
            for scope, u in split
        ]  # fmt: skip
        headers = ("FRAGMENTATION", "TOTAL", "WITHIN SEGMENTS (compaction fixes)", "ACROSS SEGMENTS (segments going back fix)")
        parts += ["", render_table(headers, frag_rows, "lrrr")]
    if stats.paged_pools:
        paged_rows = [
            [p.pool, str(p.num_blocks), str(p.blocks_used), str(p.blocks_free), str(p.sequences),
             str(p.tokens_used), str(p.tokens_reserved), str(p.tokens_free), f"{p.fragmentation:.2f}"]
            for p in stats.paged_pools
        ]  # fmt: skip
        headers = ("PAGED POOL", "BLOCKS", "USED", "FREE", "SEQUENCES", "TOKENS USED", "RESERVED", "TOKENS FREE", "FRAG")
        parts += ["", render_table(headers, paged_rows, "lrrrrrrrr")]
    if any(m.calls for m in stats.methods):
        parts += ["", f"RPCs in the last {format_duration(stats.window_seconds)}:", render_methods(stats.methods)]
    if stats.recent_errors:
        parts += ["", f"Recent errors ({len(stats.recent_errors)} shown of {stats.errors_total} since the start), "
                      "newest first:", render_recent_errors(stats.recent_errors)]  # fmt: skip
    return "\n".join(parts)


def render_recent_errors(errors: Sequence[pb.RecentError]) -> str:
    """One row per failed call (the Stats RPC's ``recent_errors``): when, method, code,
    and the message the caller got."""
    rows = [[format_time(e.time), e.method, e.code, e.message] for e in errors]
    return render_table(("TIME", "METHOD", "CODE", "MESSAGE"), rows, "llll")


def render_methods(methods: Sequence[pb.MethodStats]) -> str:
    """Per-method calls, errors and latency percentiles (the Stats RPC's ``methods``) of
    the methods called in the window, busiest first; the error column lists the codes."""
    rows = [
        [m.method, str(m.calls), str(m.errors), format_latency(m.p50_seconds), format_latency(m.p95_seconds),
         format_latency(m.p99_seconds),
         ", ".join(f"{code} {n}" for code, n in sorted(m.errors_by_code.items(), key=lambda kv: (-kv[1], kv[0])))
         or "-"]
        for m in sorted(methods, key=lambda m: (-m.calls, m.method)) if m.calls
    ]  # fmt: skip
    return render_table(("METHOD", "CALLS", "ERRORS", "P50", "P95", "P99", "ERROR CODES"), rows, "lrrrrrl")


def render_defrag(result: pb.DefragmentResponse) -> str:
    """The ``kvbroker defrag`` text: what moved (or would), the fragmentation a
    compaction fixes (within segments) apart from what it cannot (across segments), and
    the moves themselves. A paged pool's defragment has its own text (``render_paged_defrag``)."""
    if result.paged:
        return render_paged_defrag(result)
    noun = "cache" if result.caches_moved == 1 else "caches"
    segs = "segment" if result.segments_freed == 1 else "segments"
    verb, freed = ("would move", "would be freed") if result.dry_run else ("moved", "freed")
    prefix = "dry run: " if result.dry_run else ""
    ratio = lambda before, after: f"{format_ratio(before)} -> {format_ratio(after)}"  # noqa: E731
    lines = [
        f"{prefix}{verb} {result.caches_moved} {noun} ({format_bytes(result.bytes_moved)}); "
        f"{result.segments_freed} {segs} {freed} ({format_bytes(result.segments_freed_bytes)} back to the device); "
        f"took {result.duration_seconds * 1000:.1f} ms",
        f"free inside segments {format_bytes(result.free_bytes_in_segments)}; largest free range "
        f"{format_bytes(result.largest_free_extent_before_bytes)} -> {format_bytes(result.largest_free_extent_after_bytes)}",
        f"fragmentation        {ratio(result.fragmentation_before, result.fragmentation_after)}",
        f"  within segments    {ratio(result.fragmentation_within_segments_before, result.fragmentation_within_segments_after)}"
        "   compaction fixes this",
        f"  across segments    {ratio(result.fragmentation_across_segments_before, result.fragmentation_across_segments_after)}"
        "   only segments going back fix this (emptied, idle, taken by another pool)",
    ]
    if result.moves:
        rows = [
            [m.cache_id, m.pool, m.device, format_bytes(m.nbytes), f"{m.from_segment_id}:{format_bytes(m.from_offset)}",
             f"{m.to_segment_id}:{format_bytes(m.to_offset)}"]
            for m in result.moves
        ]  # fmt: skip
        lines += ["", render_table(("CACHE", "POOL", "DEVICE", "BYTES", "FROM (seg:offset)", "TO"), rows, "lllrll")]
        if result.moves_total > len(result.moves):
            lines.append(f"(first {len(result.moves)} of {result.moves_total} moves)")
    return "\n".join(lines)


def render_paged_defrag(result: pb.DefragmentResponse) -> str:
    """``kvbroker defrag --pool P`` of a paged pool: sequences moved, block copies, the
    arena's fragmentation, and the copies (sequence, from block, to block)."""
    noun = "sequence" if result.caches_moved == 1 else "sequences"
    verb = "dry run: would move" if result.dry_run else "moved"
    lines = [
        f"{verb} {result.caches_moved} {noun} into one run each: {result.moves_total} block copies "
        f"({format_bytes(result.bytes_moved)}); took {result.duration_seconds * 1000:.1f} ms",
        f"block fragmentation  {format_ratio(result.fragmentation_before)} -> {format_ratio(result.fragmentation_after)}",
    ]
    if result.block_moves:
        rows = [[m.sequence_id, str(m.from_block), str(m.to_block)] for m in result.block_moves]
        lines += ["", render_table(("SEQUENCE", "FROM BLOCK", "TO BLOCK"), rows, "lrr")]
        if result.moves_total > len(result.block_moves):
            lines.append(f"(first {len(result.block_moves)} of {result.moves_total} block copies)")
    return "\n".join(lines)


def render_sessions(sessions: Sequence[pb.SessionInfo]) -> str:
    """The ``kvbroker sessions`` text: one row per session, oldest first."""
    if not sessions:
        return "no sessions"
    rows = [
        [s.session_id, s.principal, f"{s.client_name or '?'} pid {s.pid}" + (f" on {s.host}" if s.host else ""),
         f"uid {s.peer_uid} pid {s.peer_pid}" if s.peer_known else "-", format_duration(s.age_seconds),
         format_duration(s.lease_remaining_seconds), "watch" if s.watching else "lease", str(s.holds), str(s.pins),
         str(s.mapped_segments)]
        for s in sorted(sessions, key=lambda s: -s.age_seconds)
    ]  # fmt: skip
    headers = ("SESSION", "PRINCIPAL", "CLIENT (SAYS)", "PEER (KERNEL)", "AGE", "LEASE LEFT", "KIND", "HOLDS",
               "PINS", "SEGMENTS")  # fmt: skip
    noun = "session" if len(sessions) == 1 else "sessions"
    return render_table(headers, rows, "llllrrlrrr") + f"\n\n{len(sessions)} {noun}"
