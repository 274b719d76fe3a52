"""What the RPC latency cases share: the pool, the cache size, the channel options, and
the daemon they run against (benchmarks/rpc_latency.py documents the whole benchmark)."""

from __future__ import annotations

from benchmarks.harness import MiB

POOL = "default"
ALLOC_BYTES = 1 * MiB
HOST_CAPACITY = "3GiB"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
]
