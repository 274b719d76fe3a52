"""A cache as a model worker sees it: an id, a hold, and zero-copy tensor views.

``Cache`` (sync) and ``AsyncCache`` (asyncio) are returned by ``allocate`` and ``attach``;
they are never built by hand. Each wraps one ``Held`` record of its client's core
(``kvbroker_client.core``), which says what the cache may be used for, and reaches its
client only through the small interface below (``Transport``): ``core`` to read and
plan, ``drive`` to run a plan's calls. Views come from the process-wide
``SegmentMapper`` (``kvbroker_client.mapping.process_mapper``), so every cache of a
segment shares one mapping, however many clients the process opens.

Invariants:
    * A view is built only from a handle the client's session still holds: never of a
      released cache, an evicted one, or one whose session is over (``SessionLost``).
    * A view is valid for the handle's epoch. The broker bumps the epoch when it moves
      or evicts an unpinned cache; ``pin()`` (and ``pinned()``) fetch a fresh handle, so
      ``with cache.pinned() as t:`` is the safe way to touch an unpinned cache.
    * ``release()`` is idempotent; once released, ``tensor()`` refuses.
    * A view already built never reaches bytes this client no longer holds once it knows
      it: when it releases the cache, or learns that the broker evicted or moved it or
      ended its session, the view's pages are re-mapped to private zero-filled memory
      (``kvbroker_client/revoke.py``). The view stays a valid tensor; writes through it
      go nowhere shared. (Host memory only; a CUDA view cannot be re-mapped.)

Not thread-safe per object: share the client across threads, not one ``Cache``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client.core import ClientCore, Held, HeldState
from kvbroker_client.dtypes import DTypeLike, to_proto_dtype, to_torch_dtype, torch_dtype_of

if TYPE_CHECKING:
    import torch

    from kvbroker_client.calls import Plan

# torch and the mapping module are imported on first view, not here: the operator CLI
# imports this package and should not pay torch's import (seconds) to print a table.

__all__ = ["AsyncCache", "AsyncTransport", "Cache", "Transport"]

T = TypeVar("T")


class Transport(Protocol):
    """What a ``Cache`` needs of its client (``BrokerClient`` provides it)."""

    @property
    def core(self) -> ClientCore: ...

    def drive(self, plan: Plan[T]) -> T: ...


class AsyncTransport(Protocol):
    """What an ``AsyncCache`` needs of its client (``AsyncBrokerClient`` provides it)."""

    @property
    def core(self) -> ClientCore: ...

    async def drive(self, plan: Plan[T]) -> T: ...


class _CacheBase:
    """What sync and async caches share: the record, the default view, and the views."""

    def __init__(
        self, client: Any, held: Held, *, dtype: DTypeLike | None = None, shape: Sequence[int] | None = None
    ) -> None:
        self._client = client
        self._core: ClientCore = client.core
        self._held = held
        info = held.info
        self._dtype = to_proto_dtype(dtype) if dtype is not None else info.dtype
        if shape is None and dtype is None and info.dtype and info.shape:
            shape = tuple(info.shape)
        self._shape = tuple(int(d) for d in shape) if shape is not None else None

    @property
    def stale(self) -> bool:
        """True when the broker moved the cache since this object's handle was issued:
        the next ``tensor()`` (sync) or ``refresh()`` fetches the new place."""
        return self._core.state(self._held) is HeldState.STALE

    @property
    def evicted(self) -> bool:
        """True once the broker said it evicted the cache (or a record says so)."""
        return self._core.state(self._held) is HeldState.EVICTED

    @property
    def lost(self) -> bool:
        """True when the session this cache was held under is over and it was not
        re-attached since: views refuse with ``SessionLost`` (a retained cache is
        re-attached by its next ``tensor()``, ``pin()`` or ``refresh()``)."""
        return self._core.state(self._held) is HeldState.LOST

    @property
    def cache_id(self) -> str:
        return self._held.info.cache_id

    @property
    def pool(self) -> str:
        return self._held.info.pool

    @property
    def nbytes(self) -> int:
        """Bytes asked for (the broker may reserve more: ``info.reserved_bytes``)."""
        return self._held.info.nbytes

    @property
    def device(self) -> str:
        """``"host"`` or a GPU UUID, never an index."""
        return self._held.info.device

    @property
    def epoch(self) -> int:
        """The epoch of the last record seen; it changes when the cache moves or is evicted."""
        return self._held.info.epoch

    @property
    def is_pinned(self) -> bool:
        """Whether any holder pinned the cache, as of the last record seen."""
        return self._held.info.pinned

    @property
    def released(self) -> bool:
        return self._held.released

    @property
    def info(self) -> pb.Cache:
        """The broker's record as of the last call that returned it (a copy-free view)."""
        return self._held.info

    @property
    def handle(self) -> pb.Handle:
        """Where the bytes are: segment and byte range, valid for ``handle.epoch``."""
        return self._held.handle

    def _view(self, dtype: DTypeLike | None, shape: Sequence[int] | None) -> torch.Tensor:
        from kvbroker_client.mapping import process_mapper

        if dtype is not None:
            resolved = to_torch_dtype(dtype)
        else:
            resolved = torch_dtype_of(self._dtype)
            if shape is None:
                shape = self._shape
        return process_mapper().view(self._held.handle, resolved, shape, owner=self._core)

    def __repr__(self) -> str:
        state = self._core.state(self._held)
        if state is HeldState.LIVE:
            label = pb.CacheState.Name(self._held.info.state).removeprefix("CACHE_STATE_").lower()
        else:
            label = state.value
        return (
            f"{type(self).__name__}(cache_id={self.cache_id!r}, pool={self.pool!r}, nbytes={self.nbytes}, "
            f"device={self.device!r}, epoch={self.epoch}, state={label})"
        )


class Cache(_CacheBase):
    """A cache held by a ``BrokerClient``. ``with client.allocate(...) as cache:`` releases
    it on exit."""

    _client: Transport

    def tensor(self, dtype: DTypeLike | None = None, shape: Sequence[int] | None = None) -> torch.Tensor:
        """A zero-copy view of the cache's bytes.

        Every call checks that the client's session still holds the cache, and follows a
        move (one Attach) before building the view; a cache of a lost session is
        re-attached by id if it survived (retained, or brought back by a restarted
        broker), else ``CacheLost``. A view already built is taken back when the client
        learns that it no longer holds the bytes (moved, evicted, session over): its
        pages become private memory, so it no longer sees the cache (host memory; a CUDA
        view cannot be taken back and keeps pointing at the old bytes). Between the
        broker's decision and the client learning it (the Watch stream's latency) a
        write through an old view can still land. So do not keep views across uses:
        build one per use, inside ``with cache.pinned() as t:`` (pinned bytes are never
        moved or evicted, and the block fails with ``SessionLost`` if the session ended
        during it).

        Args:
            dtype: element type; default: the dtype given at allocation (or recorded by
                the broker), else ``uint8``.
            shape: default: the shape given at allocation (when ``dtype`` is not
                overridden), else 1-D over all the bytes. It may cover fewer bytes than
                the cache, never more.

        Raises:
            PreconditionFailed: this client already released the cache.
            CacheEvicted: the broker evicted it (its bytes are gone).
            SessionLost: the session it was held under is over, and no new session is
                open yet to tell whether the cache survived.
            CacheLost: (a ``SessionLost`` and a ``CacheEvicted``) the cache did not
                survive its session's end: not retained, or the broker restarted without
                it. A retained or restored one is re-attached instead (one Attach).
            kvbroker_client.mapping.HandleError: the handle cannot be mapped here, or the
                view does not fit.

        Cost: a state check; the first view of a segment in this process maps it (an
        ``mmap``, or a CUDA IPC open); every later view is a slice, microseconds
        whatever the size.
        """
        self._client.drive(self._core.view(self._held))
        return self._view(dtype, shape)

    #: The kvcached guide's name for ``tensor()`` (its workers call ``cache.get_tensor()``);
    #: the same method, with the same warning about views kept across uses.
    get_tensor = tensor

    def refresh(self) -> None:
        """Fetch the cache's current record and handle from the broker (one Attach); for a
        retained cache whose session was lost, this re-attaches it."""
        self._client.drive(self._core.refresh(self._held))

    def release(self, force: bool = False) -> bool:
        """Drop this client's hold (and its pins). Harmless when already released, or
        when the session it was held under is over (its hold went with it).

        Args:
            force: free the cache even if it is retained or held by others (refused while
                another holder pins it: ``PreconditionFailed``).

        Returns:
            True when this call freed the cache's memory.
        """
        return self._client.drive(self._core.release(self._held, force))

    def pin(self) -> None:
        """Pin the cache (counted): it is neither evicted nor moved until unpinned. Also
        refreshes the handle, so views built afterwards follow any earlier move.

        Raises:
            CacheEvicted: the cache was evicted before it could be pinned.
            SessionLost: as for ``tensor()``.
        """
        self._client.drive(self._core.pin(self._held))

    def unpin(self) -> None:
        """Drop one of this client's pins. ``PreconditionFailed`` if it holds none;
        ``SessionLost`` if its session ended (the pins went with it)."""
        self._client.drive(self._core.unpin(self._held))

    @contextlib.contextmanager
    def pinned(self, dtype: DTypeLike | None = None, shape: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Pin, yield a fresh view, unpin: the safe way to touch an unpinned cache. If the
        session ended inside the block, leaving it raises ``SessionLost``: the pin was
        gone, and the block's reads and writes may have met another tenant's bytes.

        Cost: two RPCs (Pin and Unpin) around the body.
        """
        self.pin()
        try:
            yield self.tensor(dtype, shape)
        finally:
            if not self.released:
                self.unpin()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class AsyncCache(_CacheBase):
    """A cache held by an ``AsyncBrokerClient``; the RPC methods are coroutines and
    ``async with client.allocate(...) as cache:`` releases it on exit. ``tensor()`` stays
    synchronous: it never talks to the broker, so a moved cache, or a retained one whose
    session was lost, needs ``await cache.refresh()`` (or ``async with cache.pinned()``)
    first."""

    _client: AsyncTransport

    def tensor(self, dtype: DTypeLike | None = None, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Like ``Cache.tensor`` (read its warning about views kept across uses), without
        any call: raises ``PreconditionFailed`` (moved) or ``SessionLost`` where the sync
        one would call Attach first."""
        self._core.ready(self._held)
        return self._view(dtype, shape)

    #: Like ``Cache.get_tensor``: ``tensor()`` under the kvcached guide's name.
    get_tensor = tensor

    async def refresh(self) -> None:
        """Like ``Cache.refresh``."""
        await self._client.drive(self._core.refresh(self._held))

    async def release(self, force: bool = False) -> bool:
        """Like ``Cache.release``."""
        return await self._client.drive(self._core.release(self._held, force))

    async def pin(self) -> None:
        """Like ``Cache.pin``."""
        await self._client.drive(self._core.pin(self._held))

    async def unpin(self) -> None:
        """Like ``Cache.unpin``."""
        await self._client.drive(self._core.unpin(self._held))

    @contextlib.asynccontextmanager
    async def pinned(
        self, dtype: DTypeLike | None = None, shape: Sequence[int] | None = None
    ) -> AsyncIterator[torch.Tensor]:
        """Like ``Cache.pinned``: ``async with cache.pinned() as t:``."""
        await self.pin()
        try:
            yield self.tensor(dtype, shape)
        finally:
            if not self.released:
                await self.unpin()

    async def __aenter__(self) -> AsyncCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()
