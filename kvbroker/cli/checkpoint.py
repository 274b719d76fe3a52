"""``kvbroker checkpoint``: write the persistent pools' caches to disk now.

The command waits for the checkpoint to be published (the ``Checkpoint`` RPC returns
then), so a large pool may need a longer ``--timeout``; a checkpoint the command stops
waiting for still completes in the daemon.
"""

from __future__ import annotations

import argparse

from kvbroker.cli.formatting import format_bytes, to_json
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import BrokerClient

SUMMARY = "write the persistent pools' caches to disk now"
DESCRIPTION = (
    "Checkpoint every cache of the pools configured with persistent = true: a new generation in "
    "[persistence] dir (one safetensors file per cache, a manifest of sizes and digests, "
    "CURRENT replaced atomically; the previous generation is kept). Caches keep being served "
    "meanwhile. Fails with the reason when the disk budget (persistence.max_bytes) or the disk is "
    "full. Needs the checkpoint right on a broker with principals."
)


def render(reply: pb.CheckpointResponse) -> str:
    skipped = f", {reply.skipped} skipped (freed before their turn)" if reply.skipped else ""
    return (f"checkpoint generation {reply.generation}: {reply.caches} caches, {format_bytes(reply.written_bytes)} "
            f"in {reply.duration_seconds:.2f} s{skipped}\n  {reply.directory}")  # fmt: skip


def cmd_checkpoint(client: BrokerClient, args: argparse.Namespace) -> str:
    reply = client.drive(client.core.unary("Checkpoint", pb.CheckpointRequest()))
    return to_json(reply) if args.json else render(reply)


def add_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("checkpoint", parents=[common], help=SUMMARY, description=DESCRIPTION)
    parser.set_defaults(run=cmd_checkpoint)
