"""A pool's ``[pools.kv]`` table: the paged layout and its budget, every field checked."""

from __future__ import annotations

import pytest

from kvbroker.config import ConfigError, load_config
from kvbroker.core.types import GiB
from kvbroker.kvlayout import KvLayout

BASE = "[[pools]]\nname = 'llama'\n"


def write(tmp_path, text: str) -> str:
    path = tmp_path / "kvbroker.toml"
    path.write_text(text)
    return str(path)


def test_seed_layout_in_tokens(tmp_path):
    text = BASE + "[pools.kv]\nnum_layers = 32\nnum_kv_heads = 32\nhead_dim = 64\ndtype = 'float32'\nmax_tokens = 32768\n"
    (pool,) = load_config(path=write(tmp_path, text)).pools
    assert pool.kv.layout == KvLayout(32, 32, 64, "float32", 16)
    assert pool.kv.arena_blocks(pool.max_bytes, pool.min_bytes) == 2048
    assert 2048 * pool.kv.layout.bytes_per_block == 16 * GiB  # the seed's 17.2 GB
    assert pool.kv.prefault is True


def test_budget_from_max_bytes(tmp_path):
    text = "[[pools]]\nname = 'p'\nmax_bytes = '1MiB'\n[pools.kv]\nnum_layers = 2\nnum_kv_heads = 2\nhead_dim = 8\n" \
           "block_tokens = 4\nprefault = false\n"
    (pool,) = load_config(path=write(tmp_path, text)).pools
    # 2 layers x 2 (K, V) x 2 heads x 8 x 2 bytes = 128 bytes a token, 512 a block
    assert pool.kv.arena_blocks(pool.max_bytes, pool.min_bytes) == 2048
    assert pool.kv.prefault is False


def test_plain_pools_have_no_layout():
    assert load_config().pools[0].kv is None


@pytest.mark.parametrize(
    "kv, key",
    [
        ("num_kv_heads = 2\nhead_dim = 8\nmax_tokens = 16\n", "pools[0].kv.num_layers"),
        ("num_layers = 0\nnum_kv_heads = 2\nhead_dim = 8\nmax_tokens = 16\n", "pools[0].kv.num_layers"),
        ("num_layers = 1\nnum_kv_heads = 2.5\nhead_dim = 8\nmax_tokens = 16\n", "pools[0].kv.num_kv_heads"),
        ("num_layers = 1\nnum_kv_heads = 2\nhead_dim = true\nmax_tokens = 16\n", "pools[0].kv.head_dim"),
        ("num_layers = 1\nnum_kv_heads = 2\nhead_dim = 8\ndtype = 'float13'\nmax_tokens = 16\n", "pools[0].kv.dtype"),
        ("num_layers = 1\nnum_kv_heads = 2\nhead_dim = 8\nblock_tokens = -16\nmax_tokens = 16\n", "pools[0].kv.block_tokens"),
        ("num_layers = 1\nnum_kv_heads = 2\nhead_dim = 8\nmax_tokens = 0\n", "pools[0].kv.max_tokens"),
        ("num_layers = 1\nnum_kv_heads = 2\nhead_dim = 8\n", "pools[0].kv.max_tokens"),
        ("num_layers = 1\nnum_kv_heads = 2\nhead_dim = 8\nmax_tokens = 16\nprefault = 'yes'\n", "pools[0].kv.prefault"),
        ("num_layers = 1\nnum_kv_heads = 2\nhead_dim = 8\nmax_tokens = 16\nheads = 3\n", "pools[0].kv.heads"),
        ("num_layers = 1\nnum_kv_heads = 2\nhead_dim = 8\nmax_tokens = 16777216\nblock_tokens = 1\n", "pools[0].kv.max_tokens"),
    ],
)
def test_bad_fields_name_their_key(tmp_path, kv, key):
    with pytest.raises(ConfigError) as caught:
        load_config(path=write(tmp_path, BASE + "[pools.kv]\n" + kv))
    assert caught.value.key == key, str(caught.value)


def test_arena_beyond_max_bytes_is_refused(tmp_path):
    text = "[[pools]]\nname = 'p'\nmax_bytes = 1024\n[pools.kv]\nnum_layers = 1\nnum_kv_heads = 1\nhead_dim = 8\nmax_tokens = 1000\n"
    with pytest.raises(ConfigError, match="more than the pool's max_bytes") as caught:
        load_config(path=write(tmp_path, text))
    assert caught.value.key == "pools[0].kv.max_tokens"


def test_budget_too_small_for_one_block(tmp_path):
    text = "[[pools]]\nname = 'p'\nmax_bytes = 100\n[pools.kv]\nnum_layers = 1\nnum_kv_heads = 1\nhead_dim = 8\n"
    with pytest.raises(ConfigError, match="hold no block") as caught:
        load_config(path=write(tmp_path, text))
    assert caught.value.key == "pools[0].max_bytes"


def test_kv_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(path=write(tmp_path, BASE + "kv = 3\n"))
    assert caught.value.key == "pools[0].kv"


def test_a_paged_pool_segment_is_its_arena_unless_set(tmp_path):
    kv = "[pools.kv]\nnum_layers = 1\nnum_kv_heads = 1\nhead_dim = 8\nmax_tokens = 100\n"  # 32 B/token, 512 B/block
    (pool,) = load_config(path=write(tmp_path, BASE + kv)).pools
    assert pool.segment_bytes == 64 * 1024  # 7 blocks = 3584 bytes, in whole 64 KiB pool blocks
    (pool,) = load_config(path=write(tmp_path, BASE + "segment_bytes = '1MiB'\n" + kv)).pools
    assert pool.segment_bytes == 1 << 20
