"""The arithmetic of a paged KV cache: blocks, bytes per block and token, and back.

One function set for the daemon (a paged pool's budget in tokens), the ``kvbroker calc``
command and the client library (``kvbroker_client.KvLayout``), so that the three never
disagree by a rounding. Pure standard library, beside ``kvbroker.wire`` at the bottom of
the import layers.

The layout is the one paged-attention engines map (vLLM's FlashAttention backend): per
layer, one tensor of shape ``(2, num_blocks, block_tokens, num_kv_heads, head_dim)``, K
then V. An arena of ``num_blocks`` blocks therefore holds, for every layer, that tensor,
the layers one after another::

    bytes = num_layers * 2 * num_blocks * block_tokens * num_kv_heads * head_dim * itemsize

which is the cortexstream guide's formula (seeds/003). Its worked example, LLaMA-7B-like
(32 layers, 32 KV heads, head dim 64, float32, 32 768 tokens in blocks of 16 tokens),
gives 2 048 blocks of 8 MiB, 512 KiB per token, 17.2 GB (16 GiB) in all.

Every figure is an exact integer; tokens round *up* to whole blocks (a sequence of 17
tokens in blocks of 16 holds two blocks), bytes round *down* to whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbroker.wire import DTYPE_BY_NAME

#: Tokens per block when a layout does not say: vLLM's default and the seed's.
DEFAULT_BLOCK_TOKENS = 16


@dataclass(frozen=True, slots=True)
class KvLayout:
    """A model's KV geometry: what one token and one block of its cache weigh.

    Raises ``ValueError`` naming the field when a value is not a positive integer or the
    dtype is not one of ``kvbroker.wire.DTYPES``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field}: must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_BY_NAME:
            names = ", ".join(sorted(DTYPE_BY_NAME))
            raise ValueError(f"dtype: {self.dtype!r} is not one of {names}")

    @property
    def itemsize(self) -> int:
        """Bytes per element of ``dtype``."""
        return DTYPE_BY_NAME[self.dtype].itemsize

    @property
    def token_bytes_per_layer(self) -> int:
        """K plus V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        """K plus V of one token across every layer."""
        return self.num_layers * self.token_bytes_per_layer

    @property
    def bytes_per_block(self) -> int:
        """One block (``block_tokens`` tokens) across every layer, K and V."""
        return self.bytes_per_token * self.block_tokens

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens (rounded up to whole blocks)."""
        _check_count("tokens", tokens)
        return -(-tokens // self.block_tokens)

    def bytes_for(self, tokens: int) -> int:
        """Arena bytes that hold ``tokens`` tokens (whole blocks)."""
        return self.blocks_for(tokens) * self.bytes_per_block

    def blocks_in(self, nbytes: int) -> int:
        """Whole blocks that fit in ``nbytes`` bytes."""
        _check_count("bytes", nbytes)
        return nbytes // self.bytes_per_block

    def tokens_in(self, nbytes: int) -> int:
        """Tokens that fit in ``nbytes`` bytes, in whole blocks."""
        return self.blocks_in(nbytes) * self.block_tokens

    def layer_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        """One layer's tensor over an arena of ``num_blocks`` blocks."""
        _check_count("num_blocks", num_blocks)
        return (2, num_blocks, self.block_tokens, self.num_kv_heads, self.head_dim)

    def layer_bytes(self, num_blocks: int) -> int:
        """Bytes of one layer's tensor over ``num_blocks`` blocks; layer ``i`` starts at
        ``i * layer_bytes(num_blocks)`` in the arena."""
        _check_count("num_blocks", num_blocks)
        return num_blocks * self.block_tokens * self.token_bytes_per_layer


@dataclass(frozen=True, slots=True)
class Calculation:
    """The seed's arithmetic for one budget, every figure exact."""

    layout: KvLayout
    tokens: int  # tokens the blocks hold (a multiple of block_tokens)
    blocks: int
    total_bytes: int

    def as_dict(self) -> dict[str, int | str]:
        """The figures as ``kvbroker calc --json`` prints them."""
        lay = self.layout
        return {
            "num_layers": lay.num_layers,
            "num_kv_heads": lay.num_kv_heads,
            "head_dim": lay.head_dim,
            "dtype": lay.dtype,
            "block_tokens": lay.block_tokens,
            "bytes_per_token": lay.bytes_per_token,
            "bytes_per_block": lay.bytes_per_block,
            "blocks": self.blocks,
            "tokens": self.tokens,
            "total_bytes": self.total_bytes,
        }


def for_tokens(layout: KvLayout, tokens: int) -> Calculation:
    """What ``tokens`` tokens cost: whole blocks, and their bytes."""
    blocks = layout.blocks_for(tokens)
    return Calculation(layout, blocks * layout.block_tokens, blocks, blocks * layout.bytes_per_block)


def for_bytes(layout: KvLayout, nbytes: int) -> Calculation:
    """What ``nbytes`` bytes hold: whole blocks, and their tokens."""
    blocks = layout.blocks_in(nbytes)
    return Calculation(layout, blocks * layout.block_tokens, blocks, blocks * layout.bytes_per_block)


def calculate(
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: str = "float16",
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    tokens: int | None = None,
    nbytes: int | None = None,
) -> Calculation:
    """``kvbroker calc`` as a function: exactly one of ``tokens`` (what they cost) or
    ``nbytes`` (what fits). The client library exports it as ``kvbroker_client.kv_calc``.

    Raises ``ValueError`` naming the field for a bad layout or count, or when neither or
    both of ``tokens`` and ``nbytes`` are given.
    """
    layout = KvLayout(layers, kv_heads, head_dim, dtype, block_tokens)
    if (tokens is None) == (nbytes is None):
        raise ValueError("give exactly one of tokens (what they cost) or nbytes (what fits)")
    return for_tokens(layout, tokens) if tokens is not None else for_bytes(layout, nbytes)  # type: ignore[arg-type]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
