"""The ``kvbroker`` command: run the daemon, and the operator's views of a running one.

    kvbroker serve [daemon flags...]      run the broker (``kvbroker serve --help``)
    kvbroker stats                        capacity and usage (total, per device, per pool), RPC latencies
    kvbroker ls [--pool P] [--model M] [--state resident|evicted]
    kvbroker defrag [--device D] [--pool P] [--dry-run]

The operator commands talk to the broker through ``kvbroker_client`` as its anonymous
holder, like ``grpcurl`` would, and take ``--target`` (default ``$KVBROKER_TARGET``, else
``127.0.0.1:50051``; ``unix:///path`` works) and ``--json`` (the response in the proto3
JSON mapping with the proto's field names, as ``grpcurl`` prints it: 64-bit integers are
strings, enums are names, and zero values are kept so the shape never changes).

Exit codes: 0 success, 1 the broker refused or could not be reached (``kvbroker: <why>``
on stderr), 2 a usage error. The rendering functions are pure (message in, text out) so
they are tested without a broker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from kvbroker import __version__
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, AllocationTimeout, BrokerClient, KvBrokerError

ENV_TARGET = "KVBROKER_TARGET"

_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_STATES = {"resident": pb.CACHE_STATE_RESIDENT, "evicted": pb.CACHE_STATE_EVICTED}


# -- formatting -------------------------------------------------------------------------


def format_bytes(nbytes: int) -> str:
    """A byte count for people, in binary units: ``"512 B"``, ``"1.50 KiB"``, ``"8.00 GiB"``.

    Three significant digits from KiB up (``"12.5 MiB"``, ``"512 MiB"``), so the columns
    stay narrow; a value never rounds up to 1024 of a unit (it moves to the next one).
    """
    sign, n = ("-", -nbytes) if nbytes < 0 else ("", nbytes)
    if n < 1024:
        return f"{sign}{n} B"
    value, unit = float(n), "B"
    for unit in _BYTE_UNITS:
        value /= 1024
        if round(value, 2 if value < 10 else 1 if value < 100 else 0) < 1024 or unit == _BYTE_UNITS[-1]:
            break
    digits = 2 if value < 9.995 else 1 if value < 99.95 else 0
    return f"{sign}{value:.{digits}f} {unit}"


def format_ratio(ratio: float) -> str:
    """A 0..1 ratio as a percentage with one decimal: ``0.3125 -> "31.2%"``."""
    return "-" if math.isnan(ratio) else f"{ratio * 100:.1f}%"


def format_duration(seconds: float) -> str:
    """A coarse duration: ``"45s"``, ``"12m 05s"``, ``"2h 13m"``, ``"3d 04h"``."""
    s = max(0, int(seconds))
    days, rest = divmod(s, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """Rows as aligned columns, two spaces apart, no trailing blanks.

    Args:
        headers: column titles.
        rows: one sequence of cells per row; cells are turned into ``str``.
        align: one letter per column, ``"l"`` or ``"r"``; missing letters mean ``"l"``.
            Numbers read best right-aligned.
    """
    table = [list(map(str, headers))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = []
    for row in table:
        cells = [
            cell.rjust(width) if align[i : i + 1] == "r" else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def to_json(message: Message) -> str:
    """A response as indented JSON: the proto3 mapping with the proto's field names, every
    field present (zeros included), in the proto's field order."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return json.dumps(_in_field_order(message.DESCRIPTOR, data), indent=2)


def _in_field_order(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its keys in ``descriptor``'s field order (MessageToDict puts set
    fields first), recursing into nested messages."""
    ordered = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if isinstance(value, list):
                value = [_in_field_order(field.message_type, v) for v in value]
            elif isinstance(value, dict):
                value = _in_field_order(field.message_type, value)
        ordered[field.name] = value
    return ordered


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


def render_stats(stats: pb.StatsResponse) -> str:
    """The ``kvbroker stats`` text: a header line, one usage table (the total, then each
    device, then each pool), and the pools' limits and policies."""
    total = pb.Usage(
        total_capacity_bytes=stats.total_capacity_bytes, total_allocated_bytes=stats.total_allocated_bytes,
        free_bytes=stats.free_bytes, largest_free_extent_bytes=stats.largest_free_extent_bytes,
        pinned_bytes=stats.pinned_bytes, utilization_ratio=stats.utilization_ratio,
        fragmentation_ratio=stats.fragmentation_ratio, active_caches=stats.active_caches,
        allocation_count=stats.allocation_count, eviction_count=stats.eviction_count,
    )  # fmt: skip
    rows = [_usage_row("total", total)]
    rows += [_usage_row(f"device {d.device}", d.usage) for d in stats.devices]
    rows += [_usage_row(f"pool {p.pool}", p.usage) for p in stats.pools]
    uptime = format_duration(stats.uptime_seconds)
    header = f"kvbroker {stats.version or '?'}  instance {stats.instance_id or '?'}  up {uptime}"
    parts = [header, "", render_table(_USAGE_HEADERS, rows, _USAGE_ALIGN)]
    if stats.pools:
        pool_rows = [
            [p.pool, format_bytes(p.min_bytes), format_bytes(p.max_bytes) if p.max_bytes else "unlimited",
             str(p.priority), p.eviction_policy or "-"]
            for p in stats.pools
        ]  # fmt: skip
        parts += ["", render_table(("POOL", "MIN", "MAX", "PRIORITY", "POLICY"), pool_rows, "lrrrl")]
    if stats.methods:
        parts += ["", f"RPCs in the last {format_duration(stats.window_seconds)}:", render_methods(stats.methods)]
    return "\n".join(parts)


def format_latency(seconds: float) -> str:
    """A latency for people: ``"0.62 ms"``, ``"12.5 ms"``, ``"1.20 s"``; ``"-"`` for NaN."""
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 9.995 else f"{ms:.1f} ms" if ms < 99.95 else f"{ms:.0f} ms"


def render_methods(methods: Sequence[pb.MethodStats]) -> str:
    """Per-method calls, errors and latency percentiles (the Stats RPC's ``methods``),
    busiest first; the error column lists the status codes."""
    rows = [
        [m.method, str(m.calls), str(m.errors), format_latency(m.p50_seconds), format_latency(m.p95_seconds),
         format_latency(m.p99_seconds),
         ", ".join(f"{code} {n}" for code, n in sorted(m.errors_by_code.items(), key=lambda kv: (-kv[1], kv[0])))
         or "-"]
        for m in sorted(methods, key=lambda m: (-m.calls, m.method))
    ]  # fmt: skip
    return render_table(("METHOD", "CALLS", "ERRORS", "P50", "P95", "P99", "ERROR CODES"), rows, "lrrrrrl")


def _state_name(state: int) -> str:
    return pb.CacheState.Name(state).removeprefix("CACHE_STATE_").lower() if state in pb.CacheState.values() else "?"


def _view_of(cache: pb.Cache) -> str:
    if cache.dtype == pb.DTYPE_UNSPECIFIED:
        return "-"
    name = pb.Dtype.Name(cache.dtype).removeprefix("DTYPE_").lower() if cache.dtype in pb.Dtype.values() else "?"
    return f"{name}[{','.join(map(str, cache.shape))}]"


def render_caches(caches: Sequence[pb.Cache], *, now: float | None = None) -> str:
    """The ``kvbroker ls`` text: one row per cache, then a total line."""
    if not caches:
        return "no caches"
    now = time.time() if now is None else now
    headers = ("CACHE ID", "POOL", "MODEL", "DEVICE", "SIZE", "STATE", "PINS", "HOLDERS", "RETAIN",
               "PRIORITY", "VIEW", "EPOCH", "IDLE")  # fmt: skip
    rows = [
        [c.cache_id, c.pool, c.model_name or "-", c.device, format_bytes(c.nbytes), _state_name(c.state),
         str(c.pin_count), str(c.holder_count), "yes" if c.retain else "no", str(c.priority), _view_of(c),
         str(c.epoch), format_duration(now - c.last_access_at.ToNanoseconds() / 1e9) if c.HasField("last_access_at") else "-"]
        for c in caches
    ]  # fmt: skip
    states: dict[str, int] = {}
    for c in caches:
        states[_state_name(c.state)] = states.get(_state_name(c.state), 0) + 1
    noun = "cache" if len(caches) == 1 else "caches"
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    total = f"{len(caches)} {noun}, {format_bytes(sum(c.nbytes for c in caches))} ({by_state})"
    return render_table(headers, rows, "llllrlrrlrlrr") + "\n\n" + total


def render_defrag(result: pb.DefragmentResponse) -> str:
    """The ``kvbroker defrag`` text: one sentence of what moved (or would)."""
    noun = "cache" if result.caches_moved == 1 else "caches"
    segs = "segment" if result.segments_freed == 1 else "segments"
    verb, freed = ("would move", "would be freed") if result.dry_run else ("moved", "freed")
    prefix = "dry run: " if result.dry_run else ""
    return (
        f"{prefix}{verb} {result.caches_moved} {noun} ({format_bytes(result.bytes_moved)}); "
        f"fragmentation {format_ratio(result.fragmentation_before)} -> {format_ratio(result.fragmentation_after)}; "
        f"{result.segments_freed} {segs} {freed}; took {result.duration_seconds * 1000:.1f} ms"
    )


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


# -- commands ---------------------------------------------------------------------------


def _cmd_stats(client: BrokerClient, args: argparse.Namespace) -> str:
    stats = client.stats()
    return to_json(stats) if args.json else render_stats(stats)


def _cmd_ls(client: BrokerClient, args: argparse.Namespace) -> str:
    caches = client.list_caches(pool=args.pool, model_name=args.model, state=_STATES.get(args.state))
    return to_json(pb.ListCachesResponse(caches=caches)) if args.json else render_caches(caches)


def _cmd_defrag(client: BrokerClient, args: argparse.Namespace) -> str:
    result = client.defragment(device=args.device, pool=args.pool, dry_run=args.dry_run)
    return to_json(result) if args.json else render_defrag(result)


def _cmd_sessions(client: BrokerClient, args: argparse.Namespace) -> str:
    reply = client.sessions()
    return to_json(reply) if args.json else render_sessions(reply.sessions)


def _serve(argv: list[str]) -> int:
    from kvbroker import daemon  # lazily: the operator commands need none of the server

    return int(daemon.main(argv) or 0)


def _common_flags(defaults: bool) -> argparse.ArgumentParser:
    """The flags every operator command takes, accepted before and after the command.

    The top-level copy carries the defaults; each subcommand's copy defaults to SUPPRESS
    so it never overwrites a value given before the command. Two separate parsers,
    because argparse shares action objects between a parent and its children.
    """
    env_target = os.environ.get(ENV_TARGET) or DEFAULT_TARGET
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--target", default=env_target if defaults else argparse.SUPPRESS,
                       help=f"broker address, host:port or unix:///path (default: ${ENV_TARGET}, "
                       f"else {DEFAULT_TARGET})")  # fmt: skip
    flags.add_argument("--json", action="store_true", default=False if defaults else argparse.SUPPRESS,
                       help="print the response as JSON (proto field names)")  # fmt: skip
    flags.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S if defaults else argparse.SUPPRESS,
                       metavar="SECONDS", help=f"deadline of each call (default {DEFAULT_TIMEOUT_S:g})")  # fmt: skip
    unset = None if defaults else argparse.SUPPRESS
    flags.add_argument("--token", default=unset, help="bearer token (default: $KVBROKER_TOKEN or $KVBROKER_TOKEN_FILE)")
    flags.add_argument("--tls-ca", default=unset, metavar="PEM", help="CA of the broker's certificate: use TLS (default: $KVBROKER_TLS_CA)")
    flags.add_argument("--tls-cert", default=unset, metavar="PEM", help="client certificate for mutual TLS (default: $KVBROKER_TLS_CERT)")
    flags.add_argument("--tls-key", default=unset, metavar="PEM", help="key of --tls-cert (default: $KVBROKER_TLS_KEY)")
    return flags


def _parser() -> argparse.ArgumentParser:
    common = _common_flags(defaults=False)
    parser = argparse.ArgumentParser(
        prog="kvbroker", parents=[_common_flags(defaults=True)],
        description="A node-local broker of KV-cache memory: run it, and inspect a running one.",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"kvbroker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker daemon (kvbroker serve --help)", add_help=False)
    serve.add_argument("serve_argv", nargs=argparse.REMAINDER)

    stats = commands.add_parser("stats", parents=[common], help="capacity, usage and fragmentation")
    stats.set_defaults(run=_cmd_stats)

    ls = commands.add_parser("ls", parents=[common], help="list caches")
    ls.add_argument("--pool", default="", help="only this pool's caches")
    ls.add_argument("--model", default="", help="only this model's caches")
    ls.add_argument("--state", choices=tuple(_STATES), help="only caches in this state")
    ls.set_defaults(run=_cmd_ls)

    defrag = commands.add_parser("defrag", parents=[common], help="compact memory now")
    defrag.add_argument("--device", default="", help='only this device ("host" or a GPU UUID)')
    defrag.add_argument("--pool", default="", help="only this pool")
    defrag.add_argument("--dry-run", action="store_true", help="plan only: report what would move")
    defrag.set_defaults(run=_cmd_defrag)

    sessions = commands.add_parser("sessions", parents=[common], help="who is connected and what each holds")
    sessions.set_defaults(run=_cmd_sessions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvbroker`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])  # every flag after "serve" is the daemon's
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "serve":
        return _serve(args.serve_argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("kvbroker: error: a command is required (serve, stats, ls, defrag, sessions)", file=sys.stderr)
        return 2
    try:
        with BrokerClient(
            args.target, timeout_s=args.timeout, session_id="", token=args.token,
            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        ) as client:  # fmt: skip
            print(args.run(client, args))
    except AllocationTimeout:
        print(f"kvbroker: the broker at {args.target} did not answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    except KvBrokerError as err:
        print(f"kvbroker: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kvbroker ls | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
