"""``kvbroker blocks`` and ``kvbroker ls --sequences``: paged KV pools for operators.

``blocks --pool P`` prints the cortexstream guide's block map (``X`` used, ``.`` free, 64
blocks a line) under its statistics (sequences, blocks used and free, fragmentation,
tokens used, reserved and free), then each sequence with its tokens and block ranges
(the guide's ``dumpCacheStats``); ``--json`` the ``BlockMap`` reply. ``ls --sequences``
lists the sequences of every paged pool (or of ``--pool``): tokens used (as the worker
last reported them) and reserved, max tokens, priority, pin, holders, block ranges.
Cost: one ``BlockMap`` RPC per pool (plus one ``Stats`` to find the paged pools).
"""

from __future__ import annotations

import argparse
from typing import Any

from kvbroker.cli.formatting import dumps, to_json
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client.paged import format_block_map, format_cache_stats


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    blocks = commands.add_parser(
        "blocks", parents=[common], help="a paged pool's block map and statistics",
        description="A paged KV pool's block map (X used, . free, 64 blocks a line), its statistics "
                    "(sequences, blocks used and free, fragmentation, tokens used/reserved/free) and its "
                    "sequences with their block ranges [first, +count].",
    )  # fmt: skip
    blocks.add_argument("--pool", required=True, help="the paged pool")
    blocks.add_argument("--width", type=int, default=64, metavar="N", help="blocks per line (default 64)")
    blocks.set_defaults(run=cmd_blocks)


def cmd_blocks(client: Any, args: argparse.Namespace) -> str:
    if args.width < 1:
        raise SystemExit("kvbroker blocks: --width must be at least 1")
    reply = client.drive(client.core.unary("BlockMap", pb.BlockMapRequest(pool=args.pool)))
    if args.json:
        return to_json(reply)
    return format_cache_stats(args.pool, reply) + "\n" + format_block_map(reply, args.width)


def cmd_sequences(client: Any, args: argparse.Namespace) -> str:
    """``ls --sequences``: one row per sequence of the paged pools."""
    pools = [args.pool] if args.pool else [p.pool for p in client.stats().paged_pools]
    replies = [client.drive(client.core.unary("BlockMap", pb.BlockMapRequest(pool=p))) for p in pools]
    sequences = [s for reply in replies for s in reply.sequences]
    if args.json:
        return dumps([_sequence_json(s) for s in sequences])
    if not sequences:
        return "no sequences" + ("" if pools else " (this broker has no paged pools)")
    rows = [("POOL", "SEQUENCE", "USED", "RESERVED", "MAX", "PRIO", "PINNED", "HOLDERS", "BLOCKS")]
    for s in sequences:
        rows.append((s.pool, s.sequence_id, str(s.tokens_used), str(s.tokens_reserved), str(s.max_tokens or "-"),
                     str(s.priority), "yes" if s.pinned else "no", str(s.holder_count), _ranges(s)))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in rows)  # fmt: skip


def _ranges(seq: pb.Sequence) -> str:
    return ", ".join(f"[{r.first_block}, +{r.count}]" for r in seq.runs) or "-"


def _sequence_json(seq: pb.Sequence) -> dict[str, Any]:
    return {
        "pool": seq.pool, "sequence_id": seq.sequence_id, "tokens_used": seq.tokens_used,
        "tokens_reserved": seq.tokens_reserved, "max_tokens": seq.max_tokens, "priority": seq.priority,
        "pinned": seq.pinned, "holders": seq.holder_count,
        "blocks": [[r.first_block, r.count] for r in seq.runs],
    }  # fmt: skip
