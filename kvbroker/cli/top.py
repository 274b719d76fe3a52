"""``kvbroker top``: a live view of a broker, from one Stats call per refresh.

Per device and per pool: capacity, a bar of pinned / allocated / free bytes, utilization
and fragmentation, caches, and (pools) the allocations waiting for room; allocations,
evictions and waits per second; per RPC method the call rate and the recent P50/P99.
Rates are differences between two snapshots divided by the time between them (the
Stats counters are cumulative: ``allocation_count``, ``eviction_count``,
``allocation_waits``, ``MethodStats.calls_total``), so the first screen has none.

On a terminal the screen is redrawn in place (the alternate screen, as ``top`` does) and
``q`` or Ctrl-C quits. Otherwise (a pipe, a file, a test) one snapshot is printed per
interval, separated by a blank line, so the output is a log; ``--iterations N`` stops
after N snapshots in either mode, and ``--json`` prints one JSON object per snapshot and
line (JSON Lines). Plain ANSI escapes, no terminal library: the view is a table redrawn
every second or so, and the package also installs on every worker, which should not
carry a TUI dependency for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, NamedTuple

from kvbroker.cli.formatting import (
    bar,
    format_bytes,
    format_duration,
    format_latency,
    format_rate,
    format_ratio,
    render_table,
)
from kvbroker.cli.views import total_usage
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import BrokerClient

_ALT_SCREEN_ON, _ALT_SCREEN_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
_HOME_AND_CLEAR = "\x1b[H\x1b[J"


class Sample(NamedTuple):
    """One Stats response and when it arrived (monotonic seconds)."""

    at: float
    stats: pb.StatsResponse


def _per_second(now: float, before: float | None, seconds: float | None) -> float | None:
    if before is None or not seconds or seconds <= 0:
        return None
    return max(0.0, (now - before) / seconds)


def rates(previous: Sample | None, current: Sample) -> dict[str, dict[str, float | None]]:
    """Per-second rates between two samples: ``{"devices": {device: evictions/s},
    "pools": ..., "allocations": {scope: allocations/s}, "waits": {pool: waits/s},
    "methods": {method: calls/s}}``; every value None without a previous sample."""
    seconds = current.at - previous.at if previous else None
    old = previous.stats if previous else pb.StatsResponse()
    old_devices = {d.device: d.usage for d in old.devices}
    old_pools = {p.pool: p for p in old.pools}
    old_methods = {m.method: m.calls_total for m in old.methods}
    now = current.stats
    out: dict[str, dict[str, float | None]] = {"evictions": {}, "allocations": {}, "waits": {}, "methods": {}}
    out["evictions"]["total"] = _per_second(now.eviction_count, old.eviction_count if previous else None, seconds)
    out["allocations"]["total"] = _per_second(now.allocation_count, old.allocation_count if previous else None,
                                              seconds)  # fmt: skip
    for d in now.devices:
        before = old_devices.get(d.device) if previous else None
        key = f"device {d.device}"
        out["evictions"][key] = _per_second(d.usage.eviction_count, before and before.eviction_count, seconds)
        out["allocations"][key] = _per_second(d.usage.allocation_count, before and before.allocation_count, seconds)
    for p in now.pools:
        before_pool = old_pools.get(p.pool) if previous else None
        key = f"pool {p.pool}"
        out["evictions"][key] = _per_second(p.usage.eviction_count, before_pool and before_pool.usage.eviction_count,
                                            seconds)  # fmt: skip
        out["allocations"][key] = _per_second(p.usage.allocation_count,
                                              before_pool and before_pool.usage.allocation_count, seconds)  # fmt: skip
        out["waits"][key] = _per_second(p.allocation_waits, before_pool and before_pool.allocation_waits, seconds)
    for m in now.methods:
        out["methods"][m.method] = _per_second(m.calls_total, old_methods.get(m.method, 0) if previous else None,
                                               seconds)  # fmt: skip
    return out


def _rate(value: float | None) -> str:
    return "-" if value is None else format_rate(value)


def render_top(current: Sample, previous: Sample | None, *, target: str, interval: float, width: int = 0) -> str:
    """One screen of ``kvbroker top`` (pure: samples in, text out). ``width`` > 0 cuts
    every line to it (a terminal's width)."""
    stats = current.stats
    r = rates(previous, current)
    sessions = f"{stats.sessions} session" + ("" if stats.sessions == 1 else "s")
    lines = [
        f"kvbroker {stats.version or '?'}  instance {stats.instance_id or '?'}  up "
        f"{format_duration(stats.uptime_seconds)}  {sessions}  {target}  every {interval:g}s",
        "bars: = pinned  # allocated  . free" + ("" if previous else "   (rates from the next refresh)"),
        "",
    ]
    rows = []
    scopes = [("total", total_usage(stats), None)] + [(f"device {d.device}", d.usage, None) for d in stats.devices]
    scopes += [(f"pool {p.pool}", p.usage, p) for p in stats.pools]
    for scope, u, pool in scopes:
        rows.append([
            scope, format_bytes(u.total_capacity_bytes),
            bar(u.total_capacity_bytes, u.total_allocated_bytes, u.pinned_bytes),
            format_bytes(u.total_allocated_bytes), format_bytes(u.pinned_bytes), format_ratio(u.utilization_ratio),
            format_ratio(u.fragmentation_ratio), str(u.active_caches),
            _rate(r["allocations"].get(scope)), _rate(r["evictions"].get(scope)),
            str(pool.waiting_allocations) if pool else "", _rate(r["waits"].get(scope)) if pool else "",
        ])  # fmt: skip
    headers = ("SCOPE", "CAPACITY", "USAGE", "ALLOCATED", "PINNED", "UTIL", "FRAG", "CACHES", "ALLOC/S",
               "EVICT/S", "WAITING", "WAITS/S")  # fmt: skip
    lines.append(render_table(headers, rows, "lrlrrrrrrrrr"))
    methods = sorted(stats.methods, key=lambda m: (-(r["methods"].get(m.method) or 0), -m.calls, m.method))
    if methods:
        window = format_duration(stats.window_seconds)
        method_rows = [
            [m.method, _rate(r["methods"].get(m.method)), str(m.calls), format_latency(m.p50_seconds),
             format_latency(m.p99_seconds), str(m.errors)]
            for m in methods if m.calls or r["methods"].get(m.method)
        ]  # fmt: skip
        lines += ["", render_table(("METHOD", "CALLS/S", f"CALLS ({window})", "P50", "P99", "ERRORS"),
                                   method_rows, "lrrrrr")]  # fmt: skip
    else:
        lines += ["", "(no RPC figures: the daemon runs without telemetry)"]
    if width > 0:
        lines = [line[:width] for line in "\n".join(lines).splitlines()]
    return "\n".join(lines)


def snapshot_json(current: Sample, previous: Sample | None) -> str:
    """One line of ``top --json``: the Stats figures that the view shows, and the rates."""
    stats = current.stats
    scopes = [("total", total_usage(stats))] + [(f"device {d.device}", d.usage) for d in stats.devices]
    scopes += [(f"pool {p.pool}", p.usage) for p in stats.pools]
    data: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "instance_id": stats.instance_id,
        "sessions": stats.sessions,
        "scopes": {
            scope: {"capacity_bytes": u.total_capacity_bytes, "allocated_bytes": u.total_allocated_bytes,
                    "pinned_bytes": u.pinned_bytes, "utilization_ratio": u.utilization_ratio,
                    "fragmentation_ratio": u.fragmentation_ratio, "caches": u.active_caches}
            for scope, u in scopes
        },
        "waiting_allocations": {p.pool: p.waiting_allocations for p in stats.pools},
        "methods": {m.method: {"calls": m.calls, "p50_seconds": m.p50_seconds, "p99_seconds": m.p99_seconds,
                               "errors": m.errors} for m in stats.methods},
        "rates_per_second": rates(previous, current) if previous else None,
    }  # fmt: skip
    return json.dumps(_no_nan(data), allow_nan=False)


def _no_nan(value: Any) -> Any:
    """NaN (a percentile with no calls) as null: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _keys(stream: IO[str]) -> Iterator[Callable[[float], str]]:
    """A function that waits up to its timeout for a key on ``stream`` and returns it
    ("" for none), with the terminal in cbreak mode meanwhile (restored on exit). When
    ``stream`` is not a terminal it only waits."""
    if not stream.isatty():
        yield lambda timeout: (time.sleep(timeout), "")[1]
        return
    import termios  # noqa: PLC0415 - POSIX terminals only
    import tty  # noqa: PLC0415

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 32).decode(errors="replace") if ready else ""

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(client: BrokerClient, args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """The ``kvbroker top`` loop (see the module docstring). Returns the exit code."""
    out = sys.stdout if out is None else out
    live = out.isatty() and not args.json
    previous: Sample | None = None
    shown = 0
    if live:
        out.write(_ALT_SCREEN_ON)
    try:
        with _keys(sys.stdin if live else _NOT_A_TERMINAL) as wait_key:
            while True:
                started = time.monotonic()
                current = Sample(started, client.stats())
                if args.json:
                    out.write(snapshot_json(current, previous) + "\n")
                elif live:
                    width = shutil.get_terminal_size().columns
                    screen = render_top(current, previous, target=client.target, interval=args.interval, width=width)
                    out.write(_HOME_AND_CLEAR + screen + "\n\n(q quits)")
                else:
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    screen = render_top(current, previous, target=client.target, interval=args.interval)
                    out.write(("\n" if shown else "") + f"--- {stamp}\n{screen}\n")
                out.flush()
                previous, shown = current, shown + 1
                if args.iterations and shown >= args.iterations:
                    return 0
                deadline = started + args.interval
                while (left := deadline - time.monotonic()) > 0:
                    if "q" in wait_key(left).lower():
                        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if live:
            out.write(_ALT_SCREEN_OFF)
            out.flush()


class _NotATerminal:
    @staticmethod
    def isatty() -> bool:
        return False


_NOT_A_TERMINAL: Any = _NotATerminal()
