"""The kvcached guide's DeepSeek-OCR use case (visual memory compression), written for
kvbroker_client.

Pool ``deepseek-ocr`` of ``deploy/kvbroker.example.toml``: many small, short-lived
caches. Run a daemon with that configuration, then this worker:

    ./scripts/serve.sh --config deploy/kvbroker.example.toml --devices host
    python examples/deepseek_ocr.py [TARGET]   # default: $KVBROKER_TARGET, else 127.0.0.1:50051

Sizes are small (4 MiB, 1 MiB) so it runs in seconds on the host device; the guide's
worker asks for 256 MB and 128 MB. The guide's ``VisualMemoryCompressor`` is not part of
this repository: ``compress_memory`` below stands in for it and uses the cache as its
scratch space. These caches are not pinned, so every use is inside
``async with cache.pinned()``: the broker neither moves nor evicts a cache while it is
pinned, and a view built outside such a block may outlive the bytes it points at.

The guide's calls, and what they are here:

    pool.request_cache(model_name="DeepSeek-OCR", size_mb=256, priority="normal")
        -> broker.allocate("deepseek-ocr", model_name="DeepSeek-OCR", size_mb=256, priority="normal")
    pool.request_cache(..., cache_id=f"ocr_compress_{idx}")  -> the same ``cache_id=``
    pool.release_cache(cache.cache_id)  -> await cache.release()
"""

from __future__ import annotations

import asyncio
import sys

import torch

from kvbroker_client import AsyncBrokerClient, AsyncCache

MODEL = "DeepSeek-OCR"


async def compress_memory(text: str, metadata: dict[str, str], gpu_cache: AsyncCache) -> dict[str, object]:
    """Stand-in for the guide's compressor: render ``text`` into the cache as a 2-D
    "image" of its bytes and keep a per-row summary as the compressed form."""
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
    async with gpu_cache.pinned() as scratch:  # uint8 view of the whole cache
        width = 64
        rows = -(-data.numel() // width)
        image = scratch[: rows * width].view(rows, width)
        image.zero_()
        image.view(-1)[: data.numel()].copy_(data)
        summary = image.to(torch.int64).sum(dim=1)
    await asyncio.sleep(0)  # the model would await its GPU work here
    return {"rows": rows, "checksum": int(summary.sum()), "created_at": metadata.get("created_at", "")}


async def compress_memory_with_gpu_cache(broker: AsyncBrokerClient) -> dict[str, object]:
    """Use case 2, basic: one cache for one compression."""
    cache = await broker.allocate("deepseek-ocr", model_name=MODEL, size_mb=4, priority="normal")
    try:
        return await compress_memory(
            "Long memory content... " * 100, {"created_at": "2025-10-20T10:00:00Z"}, gpu_cache=cache
        )
    finally:
        await cache.release()


async def parallel_ocr_compression(broker: AsyncBrokerClient, memory_entries: list[dict]) -> list[dict[str, object]]:
    """Use case 2, advanced: one small cache per entry, all entries at once."""

    async def compress_entry(entry: dict, idx: int) -> dict[str, object]:
        cache = await broker.allocate("deepseek-ocr", model_name=MODEL, size_mb=1, cache_id=f"ocr_compress_{idx}")
        try:
            return await compress_memory(entry["text"], entry["metadata"], gpu_cache=cache)
        finally:
            await cache.release()

    return await asyncio.gather(*(compress_entry(entry, i) for i, entry in enumerate(memory_entries)))


async def main(target: str | None) -> None:
    async with AsyncBrokerClient(target) as broker:
        compressed = await compress_memory_with_gpu_cache(broker)
        print(f"compressed: {compressed['rows']} rows, checksum {compressed['checksum']}")
        entries = [{"text": f"memory entry {i}: " + "x" * (100 * i), "metadata": {"created_at": f"day {i}"}}
                   for i in range(8)]  # fmt: skip
        results = await parallel_ocr_compression(broker, entries)
        print("parallel:", ", ".join(str(r["checksum"]) for r in results))
        stats = await broker.summary()
        ocr = stats["pool_stats"]["deepseek-ocr"]
        print(f"deepseek-ocr: {ocr['allocation_count']} allocations, {ocr['active_caches']} caches left, "
              f"{stats['total_utilization_pct']:.1f}% of {stats['total_capacity_gb']:.2f} GB in use")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
