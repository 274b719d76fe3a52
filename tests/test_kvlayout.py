"""The paged-KV arithmetic (kvbroker/kvlayout.py) against the seed's worked example and
its own inverse."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbroker.kvlayout import KvLayout, for_bytes, for_tokens
from kvbroker.wire import DTYPES


def test_the_seeds_llama_7b_example_is_17_2_gb():
    layout = KvLayout(num_layers=32, num_kv_heads=32, head_dim=64, dtype="float32", block_tokens=16)
    calc = for_tokens(layout, 32768)
    assert calc.blocks == 2048
    assert layout.bytes_per_token == 32 * 2 * 32 * 64 * 4 == 524288
    assert layout.bytes_per_block == 16 * 524288
    assert calc.total_bytes == 17_179_869_184  # 17.2 GB, 16 GiB
    assert round(calc.total_bytes / 1e9, 1) == 17.2
    assert for_bytes(layout, 24 * 2**30).tokens == 49152


def test_tokens_round_up_to_blocks_and_bytes_round_down():
    layout = KvLayout(2, 2, 8, "float16", 16)
    assert layout.blocks_for(0) == 0
    assert layout.blocks_for(1) == 1
    assert layout.blocks_for(16) == 1
    assert layout.blocks_for(17) == 2
    assert layout.blocks_in(layout.bytes_per_block - 1) == 0
    assert layout.tokens_in(3 * layout.bytes_per_block + 5) == 48


def test_layer_shape_and_bytes_tile_the_arena():
    layout = KvLayout(4, 8, 128, "bfloat16", 16)
    assert layout.layer_shape(10) == (2, 10, 16, 8, 128)
    assert layout.layer_bytes(10) * layout.num_layers == 10 * layout.bytes_per_block


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"num_kv_heads": -1}, "num_kv_heads"),
        ({"head_dim": 1.5}, "head_dim"),
        ({"block_tokens": True}, "block_tokens"),
        ({"dtype": "float13"}, "dtype"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    base = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    with pytest.raises(ValueError, match=field):
        KvLayout(**{**base, **kwargs})


def test_negative_counts_are_refused():
    layout = KvLayout(2, 2, 8)
    with pytest.raises(ValueError, match="tokens"):
        layout.blocks_for(-1)
    with pytest.raises(ValueError, match="bytes"):
        layout.blocks_in(-5)


@given(
    layers=st.integers(1, 96),
    heads=st.integers(1, 64),
    head_dim=st.sampled_from([32, 64, 80, 128, 256]),
    dtype=st.sampled_from([d.name for d in DTYPES]),
    block=st.sampled_from([1, 8, 16, 32]),
    tokens=st.integers(0, 1 << 20),
)
def test_bytes_for_tokens_holds_them_and_no_fewer_blocks_would(layers, heads, head_dim, dtype, block, tokens):
    layout = KvLayout(layers, heads, head_dim, dtype, block)
    calc = for_tokens(layout, tokens)
    assert calc.tokens >= tokens > calc.tokens - block or tokens == calc.tokens == 0
    back = for_bytes(layout, calc.total_bytes)
    assert back.tokens == calc.tokens and back.blocks == calc.blocks
    if calc.blocks:
        assert for_bytes(layout, calc.total_bytes - 1).blocks == calc.blocks - 1
