"""``KVStorage``: the keys and values of every layer of one batch of sequences, in one
broker cache, with in-place writes, zero-copy views, geometric growth and hand-off.

This is the torch half of ``kvbroker_client.transformers`` (which adds the transformers
``Cache`` on top); it imports torch but never transformers, so it is usable by any
engine that keeps K/V as ``[batch, kv_heads, seq, head_dim]`` tensors.

Layout: one broker cache, dtype and shape recorded by the broker,

    [layers, 2 (K, V), batch, kv_heads, capacity, head_dim]

Why one plain cache and not the paged pools: an attention kernel of transformers reads a
layer's K and V as ``[batch, kv_heads, seq, head_dim]`` tensors. Here the filled part of
layer ``l``, ``t[l, 0, :, :, :length, :]``, is such a tensor already: a strided view, no
copy. Paged blocks would have to be gathered into that shape at every step.

Invariants:
    * The cache is allocated pinned (never moved nor evicted while held), so the one
      view built at allocation or attach stays valid for the storage's life.
    * It is allocated retained (by default), so a hand-off survives the sender's death
      (SIGKILL included) until the receiver attaches; the storage that ``owns`` it frees
      it at ``close()`` (a forced release), a storage that handed it off only drops its
      hold.
    * After ``export()`` this storage is read-only for good: the receiver owns the bytes.

Cost: a write is one ``copy_`` of the new tokens per layer (no ``torch.cat``); a view is a
slice (microseconds). Growth (``ensure_capacity``) allocates a new cache of at least
twice the capacity (one Allocate RPC), copies the filled tokens of every layer and frees
the old one: O(filled bytes) at each doubling, so O(1) amortized per token, and for one
moment both caches exist (3x the old bytes at peak). Size ``capacity`` up front (prompt
plus ``max_new_tokens``) to never grow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvbroker_client.cache import Cache
from kvbroker_client.dtypes import to_torch_dtype
from kvbroker_client.errors import InvalidRequest, PreconditionFailed

__all__ = ["EXPORT_FORMAT", "LAYOUT", "KVStorage", "device_hint", "parse_export"]

#: ``export()``'s ``format``: a receiver refuses any other.
EXPORT_FORMAT = "kvbroker.kv/1"
LAYOUT = "layers,kv,batch,kv_heads,capacity,head_dim"
_RANK = len(LAYOUT.split(","))


def device_hint(device: torch.device) -> str:
    """The broker's name of ``device``: ``"host"`` for the CPU, the GPU's UUID for CUDA
    (the broker names devices by UUID, never by index)."""
    if device.type == "cpu":
        return "host"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        text = str(torch.cuda.get_device_properties(index).uuid)
        return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
    raise ValueError(f"the broker serves CPU (host) and CUDA memory, not {device.type!r}")


class KVStorage:
    """One broker cache holding K and V of ``layers`` layers (see the module docstring).

    Built by ``allocate`` (a new cache) or ``attach`` (one another process exported);
    never by hand. Not thread-safe.
    """

    def __init__(self, client: Any, cache: Cache, shape: Sequence[int], dtype: torch.dtype, *, owner: bool) -> None:
        self._client = client
        self._cache = cache
        self._shape = tuple(int(d) for d in shape)
        self._dtype = dtype
        self._owner = owner
        self._handed_off = False
        self._closed = False
        self._kv = cache.tensor(dtype, self._shape)

    # -- construction ----------------------------------------------------------------

    @classmethod
    def allocate(
        cls,
        client: Any,
        *,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        pool: str = "default",
        retain: bool = True,
        model_name: str = "",
    ) -> KVStorage:
        """A new pinned (and, by default, retained) cache shaped for ``capacity`` tokens.

        Raises:
            the client's errors (``CacheExhausted``...); ``ValueError`` when the broker's
            memory is not on ``device`` (a CPU model on a GPU-only broker, say).
        """
        shape = (layers, 2, batch, kv_heads, capacity, head_dim)
        if min(shape) < 1:
            raise ValueError(f"every dimension of {LAYOUT} must be positive, got {shape}")
        cache = client.allocate(
            pool, dtype=dtype, shape=shape, pinned=True, retain=retain,
            device=device_hint(device), model_name=model_name,
        )  # fmt: skip
        storage = cls(client, cache, shape, dtype, owner=True)
        if storage._kv.device != device:
            storage.close()
            raise ValueError(f"the broker placed the cache on {storage._kv.device}, the model runs on {device}")
        return storage

    @classmethod
    def attach(cls, client: Any, exported: Mapping[str, Any]) -> KVStorage:
        """The storage another process exported (``export()``), held and pinned here; this
        process now owns it (``close()`` frees it).

        Raises:
            InvalidRequest: ``exported`` is not an export of this format, or does not fit
                the cache it names.
            CacheNotFound, CacheEvicted: the cache is gone (freed, or reclaimed before
                anyone attached).
        """
        cache_id, shape, dtype, _ = parse_export(exported)
        cache = client.attach(cache_id)
        try:
            cache.pin()
            needed = math.prod(shape) * dtype.itemsize
            if cache.nbytes < needed:
                raise InvalidRequest(f"cache {cache_id} has {cache.nbytes} bytes, the export describes {needed}")
            return cls(client, cache, shape, dtype, owner=True)
        except BaseException:
            cache.release()
            raise

    # -- what a layer reads and writes ----------------------------------------------

    @property
    def cache_id(self) -> str:
        return self._cache.cache_id

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._kv.device

    @property
    def capacity(self) -> int:
        """Tokens each sequence may hold before the next ``ensure_capacity`` grows it."""
        return self._shape[4]

    @property
    def tensor(self) -> torch.Tensor:
        """The whole cache as ``[layers, 2, batch, kv_heads, capacity, head_dim]`` (a view)."""
        return self._kv

    def keys(self, layer: int, length: int) -> torch.Tensor:
        """Layer ``layer``'s first ``length`` keys, ``[batch, kv_heads, length, head_dim]``:
        a zero-copy strided view."""
        return self._kv[layer, 0, :, :, :length]

    def values(self, layer: int, length: int) -> torch.Tensor:
        """Like ``keys``, for the values."""
        return self._kv[layer, 1, :, :, :length]

    def check_fits(self, layer: int, states: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``states`` (``[batch, kv_heads, n, head_dim]``) has this
        storage's batch, heads, head size, dtype and device."""
        _, _, batch, heads, _, head_dim = self._shape
        if states.dim() != 4 or (states.shape[0], states.shape[1], states.shape[3]) != (batch, heads, head_dim):
            raise ValueError(
                f"layer {layer}: states of shape {tuple(states.shape)} do not fit [batch={batch}, "
                f"kv_heads={heads}, seq, head_dim={head_dim}] (layers of different shapes are not supported)"
            )
        if states.dtype != self._dtype or states.device != self._kv.device:
            raise ValueError(
                f"layer {layer}: states are {states.dtype} on {states.device}, the cache is {self._dtype} on "
                f"{self._kv.device}"
            )

    def write(self, layer: int, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Copy new tokens into positions ``[start, start + n)`` of ``layer``, in place."""
        self._writable()
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"tokens [{start}, {end}) exceed the capacity {self.capacity}: ensure_capacity first")
        self._kv[layer, 0, :, :, start:end].copy_(key_states)
        self._kv[layer, 1, :, :, start:end].copy_(value_states)

    def ensure_capacity(self, needed: int, filled: int) -> None:
        """Make room for ``needed`` tokens, keeping the first ``filled`` of every layer.

        Cost: nothing when it fits; else one Allocate of ``max(needed, 2 x capacity)``
        tokens, a copy of ``filled`` tokens of every layer, one forced Release of the old
        cache (see the module docstring).
        """
        self._writable()
        if needed <= self.capacity:
            return
        layers, kv, batch, heads, capacity, head_dim = self._shape
        grown = KVStorage.allocate(
            self._client, layers=layers, batch=batch, kv_heads=heads, head_dim=head_dim,
            capacity=max(needed, 2 * capacity), dtype=self._dtype, device=self._kv.device,
            pool=self._cache.pool, retain=self._cache.info.retain, model_name=self._cache.info.model_name,
        )  # fmt: skip
        grown._kv[..., :filled, :].copy_(self._kv[..., :filled, :])
        old = self._cache
        self._cache, self._kv, self._shape = grown._cache, grown._kv, grown._shape
        old.release(force=True)

    # -- hand-off and end -----------------------------------------------------------

    def export(self, lengths: Sequence[int]) -> dict[str, Any]:
        """A small JSON-serializable description a process passes to ``attach``: the cache
        id, shape, dtype, layout and each layer's filled length. From now on this
        storage is read-only and ``close()`` only drops this process's hold: the retained
        cache waits for the receiver, even if this process is killed.

        Raises:
            PreconditionFailed: the cache is not retained (it would die with this
                process), or was already handed off or closed.
        """
        self._writable()
        if not self._cache.info.retain:
            raise PreconditionFailed(
                f"cache {self.cache_id} is not retained: create it with retain=True to hand it off"
            )
        if len(lengths) != self._shape[0] or not all(0 <= n <= self.capacity for n in lengths):
            raise ValueError(f"lengths {list(lengths)} do not fit {self._shape[0]} layers of capacity {self.capacity}")
        if self._kv.is_cuda:
            torch.cuda.synchronize(self._kv.device)  # the receiver must see every write
        self._handed_off = True
        self._owner = False
        return {
            "format": EXPORT_FORMAT,
            "cache_id": self.cache_id,
            "layout": LAYOUT,
            "shape": list(self._shape),
            "dtype": str(self._dtype).removeprefix("torch."),
            "lengths": [int(n) for n in lengths],
        }

    def close(self) -> None:
        """Free the cache if this process owns it (a forced release: it is retained), else
        drop this process's hold. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cache.release(force=self._owner)

    def _writable(self) -> None:
        if self._closed:
            raise PreconditionFailed(f"cache {self.cache_id} was closed")
        if self._handed_off:
            raise PreconditionFailed(f"cache {self.cache_id} was exported: the receiver owns it now")


def parse_export(exported: Mapping[str, Any]) -> tuple[str, tuple[int, ...], torch.dtype, list[int]]:
    """Check every field of an export; returns (cache_id, shape, dtype, lengths)."""
    if not isinstance(exported, Mapping):
        raise InvalidRequest(f"an export is a dict, got {type(exported).__name__}")
    if exported.get("format") != EXPORT_FORMAT:
        raise InvalidRequest(f"export format {exported.get('format')!r} is not {EXPORT_FORMAT!r}")
    if exported.get("layout") != LAYOUT:
        raise InvalidRequest(f"export layout {exported.get('layout')!r} is not {LAYOUT!r}")
    cache_id = exported.get("cache_id")
    if not isinstance(cache_id, str) or not cache_id:
        raise InvalidRequest("export cache_id must be a non-empty string")
    shape = exported.get("shape")
    if (
        not isinstance(shape, list) or len(shape) != _RANK or shape[1] != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):  # fmt: skip
        raise InvalidRequest(f"export shape must be {_RANK} positive integers ({LAYOUT}, kv = 2), got {shape!r}")
    dtype = exported.get("dtype")
    if not isinstance(dtype, str):
        raise InvalidRequest(f"export dtype must be a name such as 'float16', got {dtype!r}")
    torch_dtype = to_torch_dtype(dtype)
    lengths = exported.get("lengths")
    if (
        not isinstance(lengths, list) or len(lengths) != shape[0]
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= shape[4] for n in lengths)
    ):  # fmt: skip
        raise InvalidRequest(f"export lengths must be {shape[0]} integers in [0, {shape[4]}], got {lengths!r}")
    return cache_id, tuple(shape), torch_dtype, list(lengths)

