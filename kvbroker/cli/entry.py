"""The ``kvbroker`` command line: its parser, flags, checks and exit codes.

Usage errors (an unknown flag, ``--timeout -1``, a size that does not parse) exit 2
with argparse's message naming the flag, before anything is sent; the broker's refusals
and an unreachable broker exit 1 (``kvbroker: <why>`` on stderr); success exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from kvbroker import __version__
from kvbroker.cli import acting, blocks, caches, calc, ending, top
from kvbroker.cli import checkpoint as checkpoint_command
from kvbroker.cli.formatting import dumps, to_json
from kvbroker.cli.views import render_defrag, render_stats
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, AllocationTimeout, BrokerClient, KvBrokerError

ENV_TARGET = "KVBROKER_TARGET"
_STATES = {"resident": pb.CACHE_STATE_RESIDENT, "evicted": pb.CACHE_STATE_EVICTED, "pending": pb.CACHE_STATE_PENDING,
           "offloaded": pb.CACHE_STATE_OFFLOADED}
#: ListCaches page size the CLI asks for (the broker's maximum): fewer round trips.
PAGE_SIZE = 1000
COMMANDS = ("serve", "stats", "ls", "sessions", "top", "ping", "defrag", "release", "evict", "pool", "blocks",
            "checkpoint", "calc")


# -- argument types: each refuses a bad value with a message naming what is expected -----


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def size(text: str) -> int:
    """Bytes from ``"4GiB"``, ``"512MiB"``, ``"1073741824"`` (the configuration's rules,
    ``kvbroker.config.parse_size``)."""
    from kvbroker.config import ConfigError, parse_size  # noqa: PLC0415 - only pool set needs it

    try:
        value = parse_size("size", int(text) if text.isdigit() else text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("size: ")) from None
    if value >= 1 << 63:
        raise argparse.ArgumentTypeError(f"{text} is more bytes than any device has")
    return value


def int32(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not -(2**31) <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be a 32-bit integer, got {value}")
    return value


# -- commands -----------------------------------------------------------------------------


def _cmd_stats(client: BrokerClient, args: argparse.Namespace) -> str:
    stats = client.stats()
    return to_json(stats) if args.json else render_stats(stats)


def _cmd_ls(client: BrokerClient, args: argparse.Namespace) -> str:
    if args.sequences:
        return blocks.cmd_sequences(client, args)
    found = client.list_caches(pool=args.pool, model_name=args.model, state=_STATES.get(args.state),
                               page_size=PAGE_SIZE)  # fmt: skip
    if args.group_by:
        groups = caches.group(found, args.group_by)
        groups = groups[: args.limit] if args.limit else groups
        return dumps(caches.groups_json(groups, args.group_by)) if args.json else caches.render_groups(groups, args.group_by)
    shown = caches.select(found, args.sort, args.limit)
    if args.json:
        return to_json(pb.ListCachesResponse(caches=shown))
    return caches.render_caches(shown, matched=len(found))


def _cmd_defrag(client: BrokerClient, args: argparse.Namespace) -> str:
    result = client.defragment(device=args.device, pool=args.pool, dry_run=args.dry_run,
                               target_bytes=args.target_bytes)  # fmt: skip
    return to_json(result) if args.json else render_defrag(result)


def _cmd_sessions(client: BrokerClient, args: argparse.Namespace) -> str:
    return ending.run(client, args)  # lists, or ends with --end-older-than / --end


def _serve(argv: list[str]) -> int:
    from kvbroker import daemon  # lazily: the operator commands need none of the server

    return int(daemon.main(argv) or 0)


# -- the parser -------------------------------------------------------------------------------


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
    flags.add_argument("--timeout", type=positive_seconds, metavar="SECONDS",
                       default=DEFAULT_TIMEOUT_S if defaults else argparse.SUPPRESS,
                       help=f"deadline of each call, > 0 (default {DEFAULT_TIMEOUT_S:g})")  # fmt: skip
    unset = None if defaults else argparse.SUPPRESS
    flags.add_argument("--token", default=unset, help="bearer token (default: $KVBROKER_TOKEN or $KVBROKER_TOKEN_FILE)")
    flags.add_argument("--tls-ca", default=unset, metavar="PEM", help="CA of the broker's certificate: use TLS (default: $KVBROKER_TLS_CA)")
    flags.add_argument("--tls-cert", default=unset, metavar="PEM", help="client certificate for mutual TLS (default: $KVBROKER_TLS_CERT)")
    flags.add_argument("--tls-key", default=unset, metavar="PEM", help="key of --tls-cert (default: $KVBROKER_TLS_KEY)")
    return flags


def _command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser, name: str, summary: str,
             description: str) -> argparse.ArgumentParser:  # fmt: skip
    return commands.add_parser(name, parents=[common], help=summary, description=description)


def _parser() -> argparse.ArgumentParser:
    common = _common_flags(defaults=False)
    parser = argparse.ArgumentParser(
        prog="kvbroker", parents=[_common_flags(defaults=True)],
        description="A node-local broker of KV-cache memory: run it, and inspect and operate a running one.",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"kvbroker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker daemon (kvbroker serve --help)", add_help=False)
    serve.add_argument("serve_argv", nargs=argparse.REMAINDER)

    stats = _command(commands, common, "stats", "capacity, usage and fragmentation",
                     "Capacity, allocated, free, pinned bytes, utilization and fragmentation in total, per device "
                     "and per pool; pool limits, waiting allocations; calls, errors and P50/P95/P99 per RPC method "
                     "over the last five minutes.")  # fmt: skip
    stats.set_defaults(run=_cmd_stats)

    ls = _command(commands, common, "ls", "list caches, their holders and pins",
                  "List caches: size, state, pins, holders (their session ids, for a caller with the list right), "
                  "age and time since the last attach or pin. Sort, limit, or sum them per model or pool.")  # fmt: skip
    ls.add_argument("--pool", default="", help="only this pool's caches")
    ls.add_argument("--model", default="", help="only this model's caches")
    ls.add_argument("--state", choices=tuple(_STATES), help="only caches in this state")
    ls.add_argument("--sort", choices=tuple(caches.SORTS),
                    help="size: biggest first; age: oldest first; last-used: longest unused first (default: by id)")
    ls.add_argument("--limit", type=positive_int, metavar="N", help="show at most N caches (or groups)")
    ls.add_argument("--group-by", choices=caches.GROUPS,
                    help="one row per model or pool: caches, bytes, pinned, idle retained, evicted, holders")
    ls.add_argument("--sequences", action="store_true",
                    help="the paged pools' sequences: tokens used/reserved, max, priority, pin, block ranges")
    ls.set_defaults(run=_cmd_ls)

    sessions = _command(commands, common, "sessions", "who is connected and what each holds",
                        "Live sessions: principal, what the client says of itself, what the kernel says (peer "
                        "uid and pid), age, lease left, holds, pins and mapped segments. --end-older-than "
                        "AGE (or --end SESSION) ends sessions as a lapsed lease would.")  # fmt: skip
    ending.add_flags(sessions)
    sessions.set_defaults(run=_cmd_sessions)

    live = _command(commands, common, "top", "a live view, refreshed",
                    "A live view: per device and pool, capacity and a bar of pinned / allocated / free bytes, "
                    "utilization, fragmentation, allocations, evictions and waits per second; per RPC method "
                    "calls per second and P50/P99. q or Ctrl-C quits. Not on a terminal (or with --json), one "
                    "snapshot per interval.")  # fmt: skip
    live.add_argument("--interval", type=positive_seconds, default=2.0, metavar="SECONDS",
                      help="seconds between refreshes (default 2)")
    live.add_argument("--iterations", type=positive_int, metavar="N", help="stop after N refreshes")
    live.set_defaults(run=top.run_top, prints=True)

    ping = _command(commands, common, "ping", "is the broker serving, and how fast does it answer",
                    "Health-check the CacheBroker service (gRPC health) and time the round trips; with the "
                    "broker's version, instance, uptime and sessions. Exit 0 when it serves, else 1.")  # fmt: skip
    ping.add_argument("--count", type=positive_int, default=3, metavar="N", help="health checks to time (default 3)")
    ping.set_defaults(run=acting.cmd_ping)

    defrag = _command(commands, common, "defrag", "compact memory now",
                      "Compact a device or a pool now: move caches so free space is contiguous (pinned caches "
                      "never move), or report what would move with --dry-run.")  # fmt: skip
    defrag.add_argument("--device", default="", help='only this device ("host" or a GPU UUID)')
    defrag.add_argument("--pool", default="", help="only this pool")
    defrag.add_argument("--dry-run", action="store_true", help="plan only: report what would move")
    defrag.add_argument("--target-bytes", type=size, default=0, metavar="SIZE",
                        help='only open one free extent this large (e.g. "512MiB") per pool and device, '
                             "moving the fewest bytes (default 0: pack everything)")
    defrag.set_defaults(run=_cmd_defrag)

    release = _command(commands, common, "release", "release (or free by force) a cache",
                       "Drop this caller's hold on a cache (it is freed when nobody holds it and it is not "
                       "retained); --force frees it whoever holds or retains it, unless another holder pins it "
                       "(its holders are told EVICTED; needs the force_release right on a broker with principals).")  # fmt: skip
    release.add_argument("cache_id", metavar="CACHE", help="the cache's id")
    release.add_argument("--force", action="store_true", help="free it even if retained or held by others")
    release.set_defaults(run=acting.cmd_release)

    evict = _command(commands, common, "evict", "evict a pool's caches now",
                     "Evict a pool's unpinned caches now, in its eviction policy's order, or with --idle only its "
                     "retained caches that nobody holds. Holders are told EVICTED. Pinned and pending caches stay. "
                     "Needs the force_release right on a broker with principals.")  # fmt: skip
    evict.add_argument("--pool", required=True, help="the pool")
    evict.add_argument("--idle", action="store_true", help="only retained caches that nobody holds")
    evict.add_argument("--device", default="", help="only on this device")
    evict.set_defaults(run=acting.cmd_evict)

    pool = commands.add_parser("pool", help="change a pool's limits at run time",
                               description="Act on a pool at run time (pool set).")  # fmt: skip
    pool_commands = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    pool_set = _command(pool_commands, common, "set", "change a pool's max, min or priority",
                        "Change a pool's limits now, until the daemon restarts (the configuration file is not "
                        "changed; the daemon logs the change). A --max below what the pool holds gives segments "
                        "back: empty ones first, then those of idle retained caches, then those with the fewest "
                        "cache bytes, evicting their caches; it is refused, changing nothing, if that would touch "
                        "pinned or pending caches. Sizes: 4GiB, 512MiB, 1.5GB or bytes. Needs the set_limits "
                        "right on a broker with principals.")  # fmt: skip
    pool_set.add_argument("pool", metavar="POOL", help="the pool")
    pool_set.add_argument("--max", type=size, metavar="SIZE", help="the pool's quota (max_bytes)")
    pool_set.add_argument("--min", type=size, metavar="SIZE", help="bytes guaranteed to the pool (min_bytes)")
    pool_set.add_argument("--priority", type=int32, metavar="N", help="the pool's priority (its caches' default)")
    pool_set.add_argument("--dry-run", action="store_true", help="report what the change would evict; change nothing")
    pool_set.set_defaults(run=acting.cmd_pool_set)
    blocks.add_parser(commands, common)
    checkpoint_command.add_command(commands, common)

    calc.add_parser(commands, positive_int, size)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvbroker`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])  # every flag after "serve" is the daemon's
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "pool" and args.max is None and args.min is None and args.priority is None:
            parser.error("pool set: give at least one of --max, --min, --priority")
        if args.command == "sessions" and args.dry_run and args.end_older_than is None and not args.end:
            parser.error("sessions: --dry-run needs --end-older-than or --end")
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "serve":
        return _serve(args.serve_argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"kvbroker: error: a command is required ({', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if getattr(args, "offline", None):  # calc: arithmetic, no broker
        try:
            print(args.offline(args))
        except ValueError as err:
            print(f"kvbroker {args.command}: {err}", file=sys.stderr)
            return 2
        return 0
    code = 0
    try:
        with BrokerClient(
            args.target, timeout_s=args.timeout, session_id="", token=args.token,
            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        ) as client:  # fmt: skip
            if getattr(args, "prints", False):
                return args.run(client, args)
            result = args.run(client, args)
            text, code = result if isinstance(result, tuple) else (result, 0)
            print(text)
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
    return code
