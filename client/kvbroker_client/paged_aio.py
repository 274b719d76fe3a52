"""``AsyncPagedPool``: ``PagedPool`` for ``AsyncBrokerClient``, its calls awaited.

The same state and the same operations (``kvbroker_client.paged``'s plans), run by an
async driver: the methods that may call the broker are coroutines (``allocate_for``,
``append_token``, ``append_tokens``, ``free_for``, ``attach``, ``report``, ``pin``,
``unpin``, ``block_map``, ``stats``, ``dump_cache_stats``, ``dump_block_map``); views,
block tables and slots are the sync pool's, unchanged. A sequence the broker moved is
re-read by the next ``append_token``/``append_tokens``, or by ``await pool.refresh(seq)``;
a view or block table of it before that raises ``SequenceMoved``. ``append_token`` still costs no
RPC inside granted blocks; only the coroutine call is added (about a microsecond). Grants
ahead (``kvbroker_client.paged_grants``) run as tasks of the running loop.

    pool = await client.paged_pool("llama")
    await pool.allocate_for("req-1", prompt_tokens=100)
    where = await pool.append_token("req-1")
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client.errors import CacheExhausted, CacheNotFound, KvBrokerError
from kvbroker_client.paged import (
    DEFAULT_GRANT_TOKENS, PagedPool, Plan, SequenceMoved, Slot, _plan, format_block_map, format_cache_stats,
)
from kvbroker_client.paged_grants import Sequence

__all__ = ["AsyncPagedPool"]


class AsyncPagedPool(PagedPool):
    """A paged pool of an ``AsyncBrokerClient``; build it with ``await
    client.paged_pool(name)`` (or ``await AsyncPagedPool.open(client, name)``)."""

    @classmethod
    async def open(cls, client: Any, pool: str, *, grant_tokens: int = DEFAULT_GRANT_TOKENS,
                   populate: bool = False) -> AsyncPagedPool:  # fmt: skip
        response = await client.drive(_plan(client.core.call("OpenPagedPool", pb.OpenPagedPoolRequest(pool=pool))))
        return cls(client, pool, grant_tokens=grant_tokens, populate=populate, _opened=response)

    async def allocate_for(  # type: ignore[override]
        self, seq_id: str, prompt_tokens: int, max_tokens: int | None = None, *, on_oom: str = "reject",
        timeout: float | None = None, priority: int | None = None, pinned: bool = False,
    ) -> int:  # fmt: skip
        """Like ``PagedPool.allocate_for``."""
        return await self._arun(self._allocated(seq_id, prompt_tokens, max_tokens, on_oom, timeout, priority, pinned))

    async def append_token(self, seq_id: str) -> Slot:  # type: ignore[override]
        """Like ``PagedPool.append_token``."""
        seq = self._seqs.get(seq_id) or await self._current(seq_id)
        if seq.used >= seq.check_at:
            await self._alook(seq_id, seq, seq.used + 1)
        return self._slots(seq, 1)[0]

    async def append_tokens(self, seq_id: str, n: int) -> list[Slot]:  # type: ignore[override]
        seq = self._seqs.get(seq_id) or await self._current(seq_id)
        if n > 0 and seq.used + n > seq.check_at:
            await self._alook(seq_id, seq, seq.used + n)
        return self._slots(seq, max(0, n))

    async def _alook(self, seq_id: str, seq: Sequence, needed: int) -> None:
        """``PagedPool._look``, awaited: the grant ahead is a task of the running loop."""
        bt, length = self.layout.block_tokens, len(seq.table)
        if seq.pending is not None and (needed > seq.capacity(bt) or seq.pending.done()):
            await self._atake_ahead(seq)
        if needed > seq.capacity(bt):
            await self._arun(self._grow(seq_id, seq, needed))
        self._send_ahead(seq_id, seq, length, self._task)

    def _task(self, plan: Plan) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._client.drive(plan))
        task.add_done_callback(_retrieve)  # an answer nobody takes (freed, moved) is not an error
        return task

    async def _atake_ahead(self, seq: Sequence) -> None:
        """``PagedPool._take_ahead``, awaited."""
        pending, seq.pending = seq.pending, None
        started = time.perf_counter()
        try:
            self._took_ahead(seq, await pending)
        except KvBrokerError:
            seq.replan(self.layout.block_tokens)
        finally:
            self.rpc_seconds += time.perf_counter() - started

    async def free_for(self, seq_id: str) -> bool:  # type: ignore[override]
        seq = self._seqs.get(seq_id) or self._moved.get(seq_id)
        if seq is not None and seq.pending is not None:  # as the sync pool: not onto a later namesake
            pending, seq.pending = seq.pending, None
            with contextlib.suppress(KvBrokerError):
                await pending
        return await self._arun(self._freed(seq_id))

    async def attach(self, seq_id: str) -> int:  # type: ignore[override]
        return await self._arun(self._attached(seq_id))

    async def report(self, seq_id: str) -> None:  # type: ignore[override]
        seq = self._seqs.get(seq_id)
        if seq is not None and seq.pending is not None:  # as the sync pool: no older count after this one
            await self._atake_ahead(seq)
        await self._arun(self._reported(seq_id))

    async def pin(self, seq_id: str, pinned: bool = True) -> None:  # type: ignore[override]
        await self._arun(self._pinned(seq_id, pinned))

    async def unpin(self, seq_id: str) -> None:  # type: ignore[override]
        await self.pin(seq_id, False)

    async def block_map(self) -> pb.BlockMapResponse:  # type: ignore[override]
        return await self._acall("BlockMap", pb.BlockMapRequest(pool=self.pool))

    async def stats(self) -> dict[str, Any]:  # type: ignore[override]
        return self.stats_of(await self.block_map())

    async def dump_cache_stats(self) -> str:  # type: ignore[override]
        return format_cache_stats(self.pool, await self.block_map())

    async def dump_block_map(self) -> str:  # type: ignore[override]
        return format_block_map(await self.block_map())

    async def refresh(self, seq_id: str) -> None:
        """Re-read a sequence's block table after the broker moved it (a no-op otherwise)."""
        if seq_id in self._moved:
            await self._arun(self._refreshed(seq_id))

    async def _current(self, seq_id: str) -> Any:
        if seq_id in self._moved:
            return await self._arun(self._refreshed(seq_id))
        return self._gone(seq_id)

    def _missing(self, seq_id: str) -> Any:
        if seq_id in self._moved:
            raise SequenceMoved(f"sequence {seq_id!r} was moved by the broker: await pool.refresh({seq_id!r}) first")
        return self._gone(seq_id)

    async def _arun(self, plan: Plan) -> Any:
        try:
            step = next(plan)
            while True:
                step = plan.send(await self._acall(*step))
        except StopIteration as stop:
            return stop.value

    async def _acall(self, method: str, request: Any, extra_ms: int = 0) -> Any:
        self._check_session()
        self.rpc_count += 1
        started = time.perf_counter()
        try:
            return await self._client.drive(_plan(self._client.core.call(method, request, extra_ms)))
        except (CacheExhausted, CacheNotFound) as err:
            raise self._typed(err, request) from None
        finally:
            self.rpc_seconds += time.perf_counter() - started


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
