"""An example model worker for the deployments in deploy/: it allocates a KV cache from
the broker through the shared Unix socket, writes it through its zero-copy mapping of the
shared memory, and reads it back (or leaves it for another worker, or checks one another
worker left).

    python example_worker.py roundtrip                  # allocate, write, read, release
    python example_worker.py write --cache-id kv-demo   # a retained cache for another worker
    python example_worker.py read  --cache-id kv-demo   # check it, then free it

The broker's address and token come from the environment, as for every client:
``KVBROKER_TARGET`` (``unix:///run/kvbroker/kvbroker.sock`` in the image) and
``KVBROKER_TOKEN_FILE`` (the secret). The bytes written are a function of the cache id,
so a reader in another process, container or pod knows what it must find; a mismatch
exits 1. The image carries this file at /usr/local/share/kvbroker/example_worker.py.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import torch

from kvbroker_client import BrokerClient


def pattern(cache_id: str, nbytes: int) -> torch.Tensor:
    """``nbytes`` bytes that only ``cache_id`` produces (a seeded generator)."""
    seed = int.from_bytes(hashlib.sha256(cache_id.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


def write(broker: BrokerClient, cache_id: str, pool: str, size: str, retain: bool):
    cache = broker.allocate(pool, size=size, cache_id=cache_id, retain=retain)
    with cache.pinned(torch.uint8) as view:  # the broker's memory itself: no copy
        view.copy_(pattern(cache.cache_id, view.numel()))
    print(f"wrote {cache.nbytes} bytes to cache {cache.cache_id} on {cache.device} (pool {cache.pool})", flush=True)
    return cache


def check(cache) -> bool:
    with cache.pinned(torch.uint8) as view:
        same = torch.equal(view, pattern(cache.cache_id, view.numel()))
    print(f"read {cache.nbytes} bytes of cache {cache.cache_id}: {'as written' if same else 'MISMATCH'}", flush=True)
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("roundtrip", "write", "read"))
    parser.add_argument("--cache-id", default="", help="the cache's id (write, read); roundtrip: the broker's")
    parser.add_argument("--pool", default="default")
    parser.add_argument("--size", default="4MiB")
    parser.add_argument("--target", default=None, help="default: $KVBROKER_TARGET")
    args = parser.parse_args(argv)
    if args.mode != "roundtrip" and not args.cache_id:
        parser.error(f"{args.mode} needs --cache-id")
    with BrokerClient(args.target) as broker:
        if args.mode == "roundtrip":
            cache = write(broker, args.cache_id, args.pool, args.size, retain=False)
            ok = check(cache)
            cache.release()
        elif args.mode == "write":
            write(broker, args.cache_id, args.pool, args.size, retain=True)  # outlives this client
            ok = True
        else:
            cache = broker.attach(args.cache_id)
            ok = check(cache)
            cache.release(force=True)  # it was retained: free it
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
