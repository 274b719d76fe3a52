"""``kvbroker blocks``, ``kvbroker ls --sequences`` and the paged rows of ``kvbroker
stats`` against a real daemon with a paged pool, as an operator types them; and the
paged pool's gauges on ``/metrics``."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kvbroker_client import BrokerClient
from tests.cli.test_commands import kvbroker
from tests.support.daemon import daemon_fixture

CONFIG = """
[devices]
host_capacity = "16MiB"

[[pools]]
name = "default"

[[pools]]
name = "kv"
[pools.kv]
num_layers = 2
num_kv_heads = 2
head_dim = 8
block_tokens = 4
max_tokens = 512
"""

daemon = daemon_fixture(config=CONFIG, scope="module", metrics=True)


@pytest.fixture
def sequences(daemon):
    with BrokerClient(daemon.target) as client:
        pool = client.paged_pool("kv", grant_tokens=0)
        pool.allocate_for("req_001", 64, max_tokens=64)
        pool.allocate_for("req_002", 10, max_tokens=100)
        pool.pin("req_002")
        pool.allocate_for("req_003", 8)
        pool.free_for("req_001")  # a hole of 16 blocks at the start
        yield pool
        for seq in ("req_002", "req_003"):
            pool.free_for(seq)


def test_blocks_prints_the_seed_block_map_and_stats(daemon, sequences):
    text = kvbroker(daemon.target, "blocks", "--pool", "kv").stdout
    lines = text.splitlines()
    assert "  Layers: 2, Heads: 2, HeadDim: 8" in lines
    assert "  BlockSize: 4, TotalBlocks: 128" in lines
    assert "  Allocated sequences: 2" in lines
    assert "  req_002: 10/12 tokens, blocks [16, +3] pinned" in lines
    assert "  req_003: 8/8 tokens, blocks [19, +2]" in lines
    assert "  Used: 5 Free: 123" in lines
    assert "  Fragmentation: 0.13" in lines  # 1 - 107 / 123
    maps = [line.strip() for line in lines if set(line.strip()) <= {"X", "."} and line.strip()]
    assert maps == ["." * 16 + "X" * 5 + "." * 43, "." * 64]
    reply = json.loads(kvbroker(daemon.target, "blocks", "--pool", "kv", "--json").stdout)
    assert reply["stats"]["blocks_used"] == "5" and reply["block_map"].count("X") == 5
    assert [s["sequence_id"] for s in reply["sequences"]] == ["req_002", "req_003"]


def test_ls_sequences_and_stats_rows(daemon, sequences):
    lines = kvbroker(daemon.target, "ls", "--sequences").stdout.splitlines()
    assert lines[0].split() == ["POOL", "SEQUENCE", "USED", "RESERVED", "MAX", "PRIO", "PINNED", "HOLDERS", "BLOCKS"]
    assert lines[1].split() == ["kv", "req_002", "10", "12", "100", "0", "yes", "1", "[16,", "+3]"]
    rows = json.loads(kvbroker(daemon.target, "ls", "--sequences", "--json").stdout)
    assert rows[1] == {"pool": "kv", "sequence_id": "req_003", "tokens_used": 8, "tokens_reserved": 8, "max_tokens": 0,
                       "priority": 0, "pinned": False, "holders": 1, "blocks": [[19, 2]]}
    stats = kvbroker(daemon.target, "stats").stdout.splitlines()
    header = next(i for i, line in enumerate(stats) if line.startswith("PAGED POOL"))
    assert stats[header + 1].split() == ["kv", "128", "5", "123", "2", "18", "20", "492", "0.13"]


def test_blocks_of_a_plain_pool_is_an_error(daemon):
    done = kvbroker(daemon.target, "blocks", "--pool", "default", ok=False)
    assert done.returncode == 1 and "not a paged pool" in done.stderr


def test_metrics_carry_the_paged_pool_figures(daemon, sequences):
    with urllib.request.urlopen(daemon.metrics_url, timeout=30) as reply:
        text = reply.read().decode()
    lines = set(text.splitlines())
    for line in (
        'kvbroker_paged_pool_blocks{pool="kv",state="used"} 5.0',
        'kvbroker_paged_pool_blocks{pool="kv",state="free"} 123.0',
        'kvbroker_paged_pool_tokens{pool="kv",state="used"} 18.0',
        'kvbroker_paged_pool_tokens{pool="kv",state="reserved"} 20.0',
        'kvbroker_paged_pool_tokens{pool="kv",state="free"} 492.0',
        'kvbroker_paged_pool_sequences{pool="kv"} 2.0',
    ):
        assert line in lines, line
    frag = next(line for line in lines if line.startswith('kvbroker_paged_pool_fragmentation_ratio{pool="kv"}'))
    assert abs(float(frag.split()[-1]) - (1 - 107 / 123)) < 1e-9


def test_defrag_of_a_paged_pool_moves_unpinned_sequences_into_runs_around_pinned_ones(daemon, sequences):
    planned = kvbroker(daemon.target, "defrag", "--pool", "kv", "--dry-run").stdout
    assert planned.startswith("dry run: would move 1 sequence into one run each: 2 block copies (1.00 KiB)"), planned  # 512 B a block
    assert "block fragmentation  13.0% -> 11.4%" in planned  # 1 - 107/123, then 1 - 109/123
    assert [line.split() for line in planned.splitlines() if line.startswith("req_003")] == [
        ["req_003", "19", "0"], ["req_003", "20", "1"]]
    reply = json.loads(kvbroker(daemon.target, "defrag", "--pool", "kv", "--json").stdout)
    assert reply["paged"] is True and reply["caches_moved"] == 1
    lines = kvbroker(daemon.target, "blocks", "--pool", "kv").stdout.splitlines()
    assert "  req_003: 8/8 tokens, blocks [0, +2]" in lines  # moved to the hole's start
    assert "  req_002: 10/12 tokens, blocks [16, +3] pinned" in lines  # pinned: where it was
    assert sequences.block_table("req_003") == [0, 1]  # the MOVED event re-read the table (or it is re-read now)
