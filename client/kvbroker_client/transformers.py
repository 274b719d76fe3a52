"""``BrokerCache``: a Hugging Face transformers ``Cache`` whose keys and values live in
broker memory, and the hand-off of a prefilled cache to another process.

Install with the optional extra (``pip install kvbroker[transformers]``); nothing else
of ``kvbroker_client`` imports this module or transformers.

    with BrokerClient() as client:
        cache = BrokerCache(client, config=model.config, capacity=prompt_len + 64)
        out = model.generate(input_ids, cache=cache, max_new_tokens=64)   # like DynamicCache

    # prefill worker                                  # decode worker (another process)
    prefill(model, prompt, mask, cache)               cache = BrokerCache.attach(client, exported)
    exported = cache.export()   # small JSON dict     model.generate(prompt, attention_mask=mask,
                                                                     cache=cache, ...)

Where the bytes are: one broker cache per ``BrokerCache``, laid out ``[layers, 2, batch,
kv_heads, capacity, head_dim]`` (``kvbroker_client.kv_storage``, which also says why a
plain cache rather than paged blocks: transformers reads each layer's K/V as one
``[batch, kv_heads, seq, head_dim]`` tensor, which here is a strided view of the filled
part, while blocks would need a gather at every step). It is allocated at the first
forward, when batch, heads, head size, dtype and device are known.

What a step costs: each layer's ``update`` copies the new tokens in place (no
``torch.cat``) and returns views (no copy). When a sequence outgrows the capacity, the
storage doubles: one Allocate RPC and a copy of the filled tokens of every layer, so
O(1) amortized per token, with both caches alive during the copy. Give ``capacity``
(prompt plus new tokens) to never grow.

Limits: every layer full attention with the same K/V shape (Llama, Mistral, Qwen2...;
sliding-window and hybrid layers are refused at construction); no beam search
(``reorder_cache``), no offloading, not compileable (``is_compileable = False``, so
``generate`` never tries ``torch.compile`` on it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbroker_client.kv_storage import KVStorage, parse_export

__all__ = ["DEFAULT_CAPACITY", "BrokerCache", "BrokerLayer", "prefill"]

#: Tokens per sequence a new cache holds when no ``capacity`` is given (then it grows).
DEFAULT_CAPACITY = 256


class BrokerLayer(CacheLayerMixin):
    """One layer's view of the shared ``KVStorage``: its filled length, and K/V as
    zero-copy views of the first ``length`` positions."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, owner: BrokerCache, index: int) -> None:
        # CacheLayerMixin.__init__ assigns keys/values, which are read-only views here.
        self._owner = owner
        self._index = index
        self._length = 0
        self.is_initialized = False

    def __repr__(self) -> str:
        return f"BrokerLayer({self._index}, length={self._length})"

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        storage = self._owner.storage
        return None if storage is None else storage.keys(self._index, self._length)

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        storage = self._owner.storage
        return None if storage is None else storage.values(self._index, self._length)

    @property
    def device(self) -> torch.device | None:
        storage = self._owner.storage
        return None if storage is None else storage.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._owner.storage_for(key_states).check_fits(self._index, key_states)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens in place after the filled part; return all of the layer's
        keys and values (views). Grows the storage first when they do not fit."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        storage = self._owner.storage_for(key_states)
        storage.check_fits(self._index, key_states)
        storage.check_fits(self._index, value_states)
        start = self._length
        end = start + key_states.shape[-2]
        storage.ensure_capacity(end, filled=self._owner.filled())  # may swap the cache under it
        storage.write(self._index, start, key_states, value_states)
        self._length = end
        return storage.keys(self._index, end), storage.values(self._index, end)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._length + query_length, 0

    def get_seq_length(self) -> int:
        return self._length

    def get_max_length(self) -> int:
        return -1  # grows

    def reset(self) -> None:
        """Forget the tokens (the memory stays allocated for the next sequence)."""
        self._length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' negative convention)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self._length = max(0, self._length + tokens_to_remove)

    def offload(self) -> None:
        raise NotImplementedError("BrokerCache layers stay in broker memory: offloading is not supported")

    def prefetch(self) -> None:
        raise NotImplementedError("BrokerCache layers stay in broker memory: offloading is not supported")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("BrokerCache does not support beam search (reorder_cache)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BrokerCache has a fixed batch: batch_repeat_interleave is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("BrokerCache has a fixed batch: batch_select_indices is not supported")


class BrokerCache(Cache):
    """A transformers ``Cache`` in broker memory; pass it where a ``DynamicCache`` goes
    (``model(..., cache=)``, ``model.generate(..., cache=)``).

    Args:
        client: a ``kvbroker_client.BrokerClient``.
        config: the model's config (its decoder's ``num_hidden_layers`` and layer types);
            or give ``num_layers``.
        num_layers: the number of attention layers, when no ``config`` is given.
        capacity: tokens per sequence to allocate at the first forward (at least that
            forward's length; it grows beyond, see the module docstring); default
            ``DEFAULT_CAPACITY``.
        pool: the broker pool to allocate from.
        retain: allocate the cache retained, so ``export()`` can hand it off and it
            survives this process's death until another process attaches (default). A
            worker that never hands off may pass False: then the broker frees the cache
            when this process's session ends, even without ``close()``.
        model_name: recorded by the broker (``kvbroker list`` shows it).

    Close it (``close()``, or ``with``) to free the memory, unless exported.
    """

    def __init__(
        self,
        client: Any,
        config: Any = None,
        *,
        num_layers: int | None = None,
        capacity: int | None = None,
        pool: str = "default",
        retain: bool = True,
        model_name: str = "",
    ) -> None:
        layers = _layer_count(config, num_layers)
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._client = client
        self._capacity = capacity
        self._pool = pool
        self._retain = retain
        self._model_name = model_name or (getattr(config, "name_or_path", "") if config is not None else "")
        self.storage: KVStorage | None = None
        super().__init__(layers=[BrokerLayer(self, i) for i in range(layers)])

    @classmethod
    def attach(cls, client: Any, exported: Mapping[str, Any], config: Any = None) -> BrokerCache:
        """The cache another process exported (``export()``), ready to continue decoding:
        held, pinned, each layer as long as the sender left it. This process owns it now
        (``close()`` frees it). No K/V byte is copied. With ``config`` (the model's), the
        export must have its number of layers.

        Raises:
            InvalidRequest: ``exported`` is malformed; CacheNotFound, CacheEvicted: gone.
            ValueError: the export's layers are not ``config``'s.
        """
        _, shape, _, lengths = parse_export(exported)
        cache = cls(client, config, num_layers=shape[0] if config is None else None)
        if len(cache.layers) != shape[0]:
            raise ValueError(f"the export has {shape[0]} layers, the model {len(cache.layers)}")
        cache.storage = KVStorage.attach(client, exported)
        for layer, length in zip(cache.layers, lengths):
            layer._length = length
            layer.is_initialized = True
        return cache

    @property
    def cache_id(self) -> str | None:
        """The broker cache's id (None before the first forward); it changes on growth."""
        return None if self.storage is None else self.storage.cache_id

    def storage_for(self, states: torch.Tensor) -> KVStorage:
        """The storage, allocated at the first call from ``states``' batch, heads, head size,
        dtype and device."""
        if self.storage is None:
            batch, heads, tokens, head_dim = states.shape
            self.storage = KVStorage.allocate(
                self._client, layers=len(self.layers), batch=batch, kv_heads=heads, head_dim=head_dim,
                capacity=max(self._capacity or DEFAULT_CAPACITY, tokens), dtype=states.dtype,
                device=states.device, pool=self._pool, retain=self._retain, model_name=self._model_name,
            )  # fmt: skip
        return self.storage

    def filled(self) -> int:
        """The longest layer's length: what a growth must keep."""
        return max((layer.get_seq_length() for layer in self.layers), default=0)

    def export(self) -> dict[str, Any]:
        """Hand the cache off: a small JSON-serializable dict (``format``, ``cache_id``,
        ``layout``, ``shape``, ``dtype``, ``lengths``) for ``BrokerCache.attach`` in another
        process. The cache is retained, so this process may exit (or be killed) at once;
        from now on this object refuses writes and ``close()`` only drops its hold.

        Raises:
            ValueError: nothing was prefilled, or the layers' lengths differ (a forward
                was interrupted).
            PreconditionFailed: created with ``retain=False``, or already exported.
        """
        lengths = [layer.get_seq_length() for layer in self.layers]
        if self.storage is None or not any(lengths):
            raise ValueError("nothing to export: run a forward (the prefill) with this cache first")
        if len(set(lengths)) != 1:
            raise ValueError(f"the layers hold different lengths {lengths}: export after a complete forward")
        return self.storage.export(lengths)

    def close(self) -> None:
        """Free the broker memory (or, once exported, drop this process's hold). Idempotent."""
        if self.storage is not None:
            self.storage.close()

    def __enter__(self) -> BrokerCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@torch.no_grad()
def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache) -> None:
    """Fill ``cache`` with the K/V of every prompt token but the last, as ``generate``
    would (positions from the attention mask, so left-padded batches match), so that
    ``model.generate(input_ids, attention_mask=..., cache=cache)`` in the decode worker
    runs only the last prompt token and then decodes: its first token and logits are
    the decode worker's own. (vLLM's prefill/decode split leaves the last token to the
    decoder the same way.)

    Cost: one forward over ``input_ids.shape[1] - 1`` tokens.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"prefill takes [batch, tokens >= 2] ids, got {tuple(input_ids.shape)}")
    if cache.get_seq_length() != 0:
        raise ValueError("prefill takes an empty cache")
    ids = input_ids[:, :-1]
    if attention_mask is None:
        model(input_ids=ids, cache=cache, use_cache=True)
        return
    mask = attention_mask[:, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)


def _layer_count(config: Any, num_layers: int | None) -> int:
    """The number of layers, from ``num_layers`` or the decoder config; refuses layer
    types other than full attention (their caches are not a plain growing sequence)."""
    if config is None:
        if num_layers is None or num_layers < 1:
            raise ValueError(f"give the model's config, or num_layers >= 1 (got {num_layers})")
        return num_layers
    text = config.get_text_config(decoder=True)
    count = int(text.num_hidden_layers)
    if num_layers is not None and num_layers != count:
        raise ValueError(f"num_layers={num_layers} contradicts the config's {count} layers")
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        kinds.add("sliding_attention")
    if kinds != {"full_attention"}:
        raise ValueError(f"BrokerCache supports full-attention layers only, the config has {sorted(kinds)}")
    return count
