"""The kvcached guide's VISTA use case (video generation), written for kvbroker_client.

The guide's worker created its own ``CachePool``; here the daemon owns the memory and
the pool is configured once, for every worker (``deploy/kvbroker.example.toml``, pool
``vista``). Run a daemon with that configuration, then this worker:

    ./scripts/serve.sh --config deploy/kvbroker.example.toml --devices host
    python examples/vista.py [TARGET]        # default: $KVBROKER_TARGET, else 127.0.0.1:50051

Sizes are small (16 MiB per cache) so it runs in seconds on the host device; a real
VISTA worker asks for ``size_mb=512`` and maps GPU memory the same way.

The guide's calls, and what they are here:

    pool.request_cache(model_name=, size_mb=, priority="high", is_pinned=True)
        -> broker.allocate("vista", model_name=, size_mb=, priority="high", pinned=True)
    cache.get_tensor()                  -> cache.get_tensor() (or cache.tensor())
    pool.release_cache(cache.cache_id)  -> await cache.release() (or broker.release(cache_id))
    pool.get_pool_statistics()          -> await broker.summary()
    pool.stop()                         -> leaving ``async with`` (the daemon keeps running)
"""

from __future__ import annotations

import asyncio
import sys

import torch

from kvbroker_client import AsyncBrokerClient, AsyncCache, CacheExhausted

CACHE_MB = 16  # the guide's VISTA caches are 512 MB
LAYERS, HEADS, HEAD_DIM = 4, 8, 64


def kv_shape(size_mb: int) -> tuple[int, int, int, int, int]:
    """(layers, K and V, tokens, heads, head_dim) of float16 filling ``size_mb`` MiB."""
    tokens = (size_mb << 20) // (LAYERS * 2 * HEADS * HEAD_DIM * 2)
    return (LAYERS, 2, tokens, HEADS, HEAD_DIM)


async def generate_video(task: int, cache: AsyncCache) -> float:
    """Stand-in for the model: write the KV cache of ``task``'s frames, read it back."""
    kv = cache.get_tensor(torch.float16, kv_shape(CACHE_MB))  # pinned: safe to keep during the task
    frames = torch.arange(kv.shape[2], dtype=torch.float16) / kv.shape[2]
    kv.copy_((frames.view(1, 1, -1, 1, 1) + task).expand_as(kv))
    await asyncio.sleep(0)  # the model would await its GPU work here
    return float(kv[:, :, -1].float().mean())


async def vista_video_generation(broker: AsyncBrokerClient) -> None:
    """Use case 1, basic: one pinned cache for one generation task."""
    try:
        cache = await broker.allocate("vista", model_name="VISTA", size_mb=CACHE_MB, priority="high", pinned=True)
    except CacheExhausted as err:  # the guide's "OOM: try a smaller cache"
        print(f"no room for {CACHE_MB} MiB ({err}); trying {CACHE_MB // 2} MiB")
        cache = await broker.allocate("vista", model_name="VISTA", size_mb=CACHE_MB // 2, priority="high", pinned=True)
    print(f"generation: cache {cache.cache_id} on {cache.device}, last frame {await generate_video(0, cache):.3f}")
    await cache.release()


async def vista_batch_generation(broker: AsyncBrokerClient, video_tasks: list[int]) -> list[float]:
    """Use case 1, advanced: pre-allocate one cache per task, run them concurrently."""
    caches = [
        await broker.allocate("vista", model_name="VISTA", size_mb=CACHE_MB, cache_id=f"batch_video_{i}", pinned=True)
        for i in range(len(video_tasks))
    ]
    try:
        return await asyncio.gather(*(generate_video(task, cache) for task, cache in zip(video_tasks, caches)))
    finally:
        for cache in caches:
            await cache.release()


async def main(target: str | None) -> None:
    async with AsyncBrokerClient(target) as broker:
        await vista_video_generation(broker)
        results = await vista_batch_generation(broker, [1, 2, 3])
        print("batch:", ", ".join(f"{r:.3f}" for r in results))
        stats = await broker.summary()  # the guide's get_pool_statistics()
        vista = stats["pool_stats"]["vista"]
        print(f"Total capacity: {stats['total_capacity_gb']:.2f} GB")
        print(f"Total allocated: {stats['total_allocated_gb']:.2f} GB")
        print(f"Utilization: {stats['total_utilization_pct']:.1f}%")
        print(f"Fragmentation: {stats['avg_fragmentation_pct']:.1f}%")
        print(f"vista: {vista['active_caches']} caches, {vista['allocation_count']} allocations")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
