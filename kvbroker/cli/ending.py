"""``kvbroker sessions --end-older-than 1h`` (and ``--end ID``): seed 004's
``cleanup_sessions(max_age)``, through the ``EndSessions`` RPC.

Ending a session is what a lapsed lease does: its holds, pins and mappings go, its
non-retained caches are freed, and its client is told (``SESSION_ENDED``,
``ended_by_operator``) and opens a new session; its views of freed caches are re-mapped
to private memory (kvbroker_client/revoke.py). ``--dry-run`` lists the sessions that
would end. Without ``--end-older-than`` or ``--end`` the command only lists sessions.
"""

from __future__ import annotations

import argparse
import math
import re

from kvbroker.cli.formatting import to_json
from kvbroker.cli.views import render_sessions
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import BrokerClient

__all__ = ["add_flags", "age", "run"]

_AGE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d)?")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def age(text: str) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"30m"``, ``"1h"``, ``"2d"`` (positive)."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected an age such as 90s, 30m, 1h or 2d, got {text!r}")
    seconds = float(match["n"]) * _UNIT_SECONDS[match["unit"]]
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive age, got {text!r}")
    return seconds


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--end-older-than", type=age, metavar="AGE",
                        help="end every session opened at least AGE ago (90s, 30m, 1h, 2d): its holds and "
                             "pins go, its non-retained caches are freed, its client opens a new session")  # fmt: skip
    parser.add_argument("--end", action="append", default=[], metavar="SESSION",
                        help="end this session (repeatable; with --end-older-than, only if also that old)")
    parser.add_argument("--dry-run", action="store_true", help="list the sessions that would end; end none")


def run(client: BrokerClient, args: argparse.Namespace) -> str:
    if args.end_older_than is None and not args.end:
        reply = client.sessions()
        return to_json(reply) if args.json else render_sessions(reply.sessions)
    reply = client.end_sessions(older_than_seconds=args.end_older_than or 0.0, session_ids=args.end,
                                dry_run=args.dry_run)  # fmt: skip
    return to_json(reply) if args.json else render_ended(reply)


def render_ended(reply: pb.EndSessionsResponse) -> str:
    """The sessions ended (or that would be), then one line of totals."""
    n = len(reply.sessions)
    noun = "session" if n == 1 else "sessions"
    if reply.dry_run:
        summary = f"would end {n} {noun} (dry run: nothing ended)"
    else:
        summary = f"ended {n} {noun}; {reply.caches_freed} non-retained cache{'' if reply.caches_freed == 1 else 's'} freed"
    if not n:
        return summary
    return render_sessions(reply.sessions).rsplit("\n\n", 1)[0] + "\n\n" + summary
