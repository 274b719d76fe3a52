"""A cache as a model worker sees it: an id, a hold, and zero-copy tensor views.

``Cache`` (sync) and ``AsyncCache`` (asyncio) are returned by ``allocate`` and ``attach``;
they are never built by hand. Both wrap the broker's ``Cache`` record and ``Handle`` and
build tensors through one process-wide ``SegmentMapper``, so every cache of a segment
shares one mapping, however many clients the process opens.

Invariants:
    * A view is valid for the handle's epoch. The broker bumps the epoch when it moves
      or evicts an unpinned cache; ``pin()`` (and ``pinned()``) fetch a fresh handle, so
      ``with cache.pinned() as t:`` is the safe way to touch an unpinned cache.
    * ``release()`` is idempotent; once released, ``tensor()`` refuses, and the views
      already built keep their memory mapped (the broker never unmaps a client) but no
      longer hold the cache, so the broker may reuse those bytes.

Not thread-safe per object: share the client across threads, not one ``Cache``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client.dtypes import DTypeLike, to_proto_dtype, to_torch_dtype, torch_dtype_of
from kvbroker_client.errors import CacheEvicted, PreconditionFailed

if TYPE_CHECKING:
    import torch

    from kvbroker_client.client import AsyncBrokerClient, BrokerClient

# torch and the mapping module are imported on first use, not here: the operator CLI
# imports this package and should not pay torch's import (seconds) to print a table.

__all__ = ["AsyncCache", "Cache"]

class _CacheBase:
    """What sync and async caches share: the record, the handle, and the views."""

    def __init__(
        self,
        client: Any,
        info: pb.Cache,
        handle: pb.Handle,
        *,
        dtype: torch.dtype | None = None,
        shape: Sequence[int] | None = None,
    ) -> None:
        self._client = client
        self._info = info
        self._handle = handle
        if dtype is None and info.dtype != pb.DTYPE_UNSPECIFIED:
            dtype = torch_dtype_of(info.dtype)
            shape = tuple(info.shape) if shape is None and info.shape else shape
        self._dtype = dtype
        self._shape = tuple(int(d) for d in shape) if shape is not None else None
        self._released = False
        # Set from the session's event thread: the epoch the broker moved or evicted at.
        self._moved_epoch = 0
        self._evicted = False

    def _note_event(self, kind: int, epoch: int) -> None:
        """Apply an EVICTED or MOVED event (called by the session's watcher)."""
        if kind == pb.EVENT_KIND_EVICTED:
            self._evicted = True
        elif epoch > self._moved_epoch:
            self._moved_epoch = epoch

    @property
    def stale(self) -> bool:
        """True when the broker moved the cache since this object's handle was issued:
        the next ``tensor()`` (sync) or ``refresh()`` fetches the new place."""
        return self._moved_epoch > self._handle.epoch

    @property
    def evicted(self) -> bool:
        """True once the broker said it evicted the cache (or a record says so)."""
        return self._evicted or self._info.state == pb.CACHE_STATE_EVICTED

    @property
    def cache_id(self) -> str:
        return self._info.cache_id

    @property
    def pool(self) -> str:
        return self._info.pool

    @property
    def nbytes(self) -> int:
        """Bytes asked for (the broker may reserve more: ``info.reserved_bytes``)."""
        return self._info.nbytes

    @property
    def device(self) -> str:
        """``"host"`` or a GPU UUID, never an index."""
        return self._info.device

    @property
    def epoch(self) -> int:
        """The epoch of the last record seen; it changes when the cache moves or is evicted."""
        return self._info.epoch

    @property
    def is_pinned(self) -> bool:
        """Whether any holder pinned the cache, as of the last record seen."""
        return self._info.pinned

    @property
    def released(self) -> bool:
        return self._released

    @property
    def info(self) -> pb.Cache:
        """The broker's record as of the last call that returned it (a copy-free view)."""
        return self._info

    @property
    def handle(self) -> pb.Handle:
        """Where the bytes are: segment and byte range, valid for ``handle.epoch``."""
        return self._handle

    def tensor(self, dtype: DTypeLike | None = None, shape: Sequence[int] | None = None) -> torch.Tensor:
        """A zero-copy view of the cache's bytes.

        Args:
            dtype: element type; default: the dtype given at allocation, else ``uint8``.
            shape: default: the shape given at allocation (when ``dtype`` is not
                overridden), else 1-D over all the bytes. It may cover fewer bytes than
                the cache, never more.

        Raises:
            PreconditionFailed: this object already released the cache.
            CacheEvicted: the last record seen says the cache was evicted.
            kvbroker_client.mapping.HandleError: the handle cannot be mapped here, or the
                view does not fit.

        Cost: the first view of a segment in this process maps it (an ``mmap``, or a CUDA
        IPC open); every later view is a slice, microseconds whatever the size.
        """
        if self._released:
            raise PreconditionFailed(f"cache {self.cache_id!r} was released by this client")
        if self.evicted:
            raise CacheEvicted(f"cache {self.cache_id!r} was evicted by the broker; its bytes are gone")
        if self.stale:
            self._resolve_moved()
        if dtype is not None:
            resolved = to_torch_dtype(dtype)
        else:
            resolved = self._dtype
            if shape is None:
                shape = self._shape
        from kvbroker_client.mapping import process_mapper

        return process_mapper().view(self._handle, resolved, shape)

    def _resolve_moved(self) -> None:
        raise NotImplementedError

    def _update(self, info: pb.Cache, handle: pb.Handle | None = None) -> None:
        self._info = info
        if handle is not None:
            self._handle = handle

    def __repr__(self) -> str:
        state = (
            "released" if self._released else pb.CacheState.Name(self._info.state).removeprefix("CACHE_STATE_").lower()
        )
        return (
            f"{type(self).__name__}(cache_id={self.cache_id!r}, pool={self.pool!r}, nbytes={self.nbytes}, "
            f"device={self.device!r}, epoch={self.epoch}, state={state})"
        )


class Cache(_CacheBase):
    """A cache held by this client (sync). ``with client.allocate(...) as cache:`` releases
    it on exit."""

    _client: BrokerClient

    def _resolve_moved(self) -> None:
        """Fetch the cache's new place after a MOVED event (one Attach)."""
        response = self._client._attach(self.cache_id)
        self._update(response.cache, response.handle)

    def refresh(self) -> None:
        """Fetch the cache's current record and handle from the broker."""
        self._resolve_moved()

    def release(self, force: bool = False) -> bool:
        """Drop this client's hold (and its pins). Harmless when already released.

        Args:
            force: free the cache even if it is retained or held by others (refused while
                another holder pins it: ``PreconditionFailed``).

        Returns:
            True when this call freed the cache's memory.
        """
        if self._released and not force:
            return False
        freed = self._client.release(self.cache_id, force=force)
        self._released = True
        self._client._forget(self)
        return freed

    def pin(self) -> None:
        """Pin the cache (counted): it is neither evicted nor moved until unpinned. Also
        refreshes the handle, so views built afterwards follow any earlier move.

        Raises:
            CacheEvicted: the cache was evicted before it could be pinned.
        """
        response = self._client._pin(self.cache_id)
        self._update(response.cache, response.handle)

    def unpin(self) -> None:
        """Drop one of this client's pins. ``PreconditionFailed`` if it holds none."""
        self._update(self._client._unpin(self.cache_id).cache)

    @contextlib.contextmanager
    def pinned(self, dtype: DTypeLike | None = None, shape: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Pin, yield a fresh view, unpin: the safe way to touch an unpinned cache.

        Cost: two RPCs (Pin and Unpin) around the body.
        """
        self.pin()
        try:
            yield self.tensor(dtype, shape)
        finally:
            if not self._released:
                self.unpin()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class AsyncCache(_CacheBase):
    """A cache held by an ``AsyncBrokerClient``; the RPC methods are coroutines and
    ``async with client.allocate(...) as cache:`` releases it on exit. ``tensor()`` stays
    synchronous: it never talks to the broker."""

    _client: AsyncBrokerClient

    def _resolve_moved(self) -> None:
        raise PreconditionFailed(
            f"cache {self.cache_id!r} was moved by the broker: `await cache.refresh()` (or use "
            "`async with cache.pinned()`) before building a view"
        )

    async def refresh(self) -> None:
        """Fetch the cache's current record and handle (after a move)."""
        response = await self._client._attach(self.cache_id)
        self._update(response.cache, response.handle)

    async def release(self, force: bool = False) -> bool:
        """Like ``Cache.release``."""
        if self._released and not force:
            return False
        freed = await self._client.release(self.cache_id, force=force)
        self._released = True
        self._client._forget(self)
        return freed

    async def pin(self) -> None:
        """Like ``Cache.pin``."""
        response = await self._client._pin(self.cache_id)
        self._update(response.cache, response.handle)

    async def unpin(self) -> None:
        """Like ``Cache.unpin``."""
        self._update((await self._client._unpin(self.cache_id)).cache)

    @contextlib.asynccontextmanager
    async def pinned(
        self, dtype: DTypeLike | None = None, shape: Sequence[int] | None = None
    ) -> AsyncIterator[torch.Tensor]:
        """Like ``Cache.pinned``: ``async with cache.pinned() as t:``."""
        await self.pin()
        try:
            yield self.tensor(dtype, shape)
        finally:
            if not self._released:
                await self.unpin()

    async def __aenter__(self) -> AsyncCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()
