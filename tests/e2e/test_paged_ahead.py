"""Grants ahead (``kvbroker_client.paged_grants``) against a real daemon: a sequence asks
for its next blocks halfway through the ones it has, so appends do not wait on grants;
the table only ever grows at its end; a free waits for a grant in flight, so the grant
cannot land on a later sequence of the same id; the async pool does the same with tasks
and leaves no unretrieved task error behind."""

from __future__ import annotations

import asyncio

import grpc
import torch

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from tests.support.daemon import daemon_fixture

# 1 layer x (K, V) x 1 head x 4 x float32 = 32 bytes a token; 16 tokens a block; 4,096 blocks.
CONFIG = """
[devices]
host_capacity = "16MiB"

[[pools]]
name = "default"

[[pools]]
name = "kv"
[pools.kv]
num_layers = 1
num_kv_heads = 1
head_dim = 4
dtype = "float32"
block_tokens = 16
max_tokens = 65536
"""
TOKENS = 3000

daemon = daemon_fixture(config=CONFIG)


def reserved(daemon, seq_id: str) -> int:
    with grpc.insecure_channel(daemon.target) as channel:
        reply = broker_pb2_grpc.CacheBrokerStub(channel).BlockMap(pb.BlockMapRequest(pool="kv"), timeout=10)
    return next(s.tokens_reserved for s in reply.sequences if s.sequence_id == seq_id)


def write_token(pool, slot: int, t: int) -> None:
    pool.layer(0)[0].view(-1, 1, 4)[slot] = float(t)


def check_tokens(pool, seq_id: str, n: int) -> None:
    expect = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 1, 4)
    assert torch.equal(pool.k_view(seq_id, 0), expect), "every token where its slot said"


def test_appends_run_on_grants_sent_ahead_and_the_table_only_grows_at_its_end(daemon):
    from kvbroker_client import BrokerClient

    with BrokerClient(daemon.target) as client:
        pool = client.paged_pool("kv")
        pool.allocate_for("s", 0)
        before = pool.rpc_count
        table: list[int] = []
        slots = set()
        for t in range(TOKENS):
            where = pool.append_token("s")
            now = pool.block_table("s")
            assert now[: len(table)] == table, f"token {t}: blocks already handed out changed"
            table = now
            slots.add(where.slot)
            write_token(pool, where.slot, t)
        assert len(slots) == TOKENS
        check_tokens(pool, "s", TOKENS)
        grants = pool.rpc_count - before
        waited = grants - pool.grants_ahead
        # The first grants bring no more than the need (nothing generated yet: no headroom),
        # which stops grants ahead until one brings headroom; from then on they run ahead.
        assert pool.grants_ahead >= 3 and waited <= 3, (grants, pool.grants_ahead)
        assert grants * 1000 / TOKENS < 10, "grants stay amortized"
        assert pool.free_for("s") is True


def test_a_free_waits_for_the_grant_in_flight_so_a_later_namesake_gets_none_of_it(daemon):
    from kvbroker_client import BrokerClient

    with BrokerClient(daemon.target) as client:
        pool = client.paged_pool("kv")
        pool.allocate_for("n", 0)
        ahead = pool.grants_ahead
        for _ in range(TOKENS):  # up to the first grant ahead, then free at once
            pool.append_token("n")
            if pool.grants_ahead > ahead:
                break
        assert pool.grants_ahead > ahead and pool.free_for("n") is True
        pool.allocate_for("n", 16)
        assert pool.block_table("n") and reserved(daemon, "n") == 16, "the new sequence holds its prompt's block alone"
        assert pool.free_for("n") is True


def test_the_async_pool_sends_grants_ahead_as_tasks(daemon):
    from kvbroker_client import AsyncBrokerClient

    async def scenario() -> list[dict]:
        errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        async with AsyncBrokerClient(daemon.target) as client:
            pool = await client.paged_pool("kv")
            await pool.allocate_for("a", 0)
            for t in range(TOKENS):
                write_token(pool, (await pool.append_token("a")).slot, t)
            check_tokens(pool, "a", TOKENS)
            assert pool.grants_ahead >= 3
            # A grant ahead in flight when the sequence is freed: awaited, not left failing.
            await pool.allocate_for("b", 0)
            ahead = pool.grants_ahead
            for _ in range(TOKENS):
                await pool.append_token("b")
                if pool.grants_ahead > ahead:
                    break
            assert pool.grants_ahead > ahead and await pool.free_for("b") is True
            assert await pool.free_for("a") is True
        return errors

    assert asyncio.run(scenario()) == [], "no task error nobody retrieved"
