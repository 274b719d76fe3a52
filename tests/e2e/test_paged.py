"""Paged KV pools end to end: real worker processes (``tests/e2e/paged_worker.py``), each
with its own session and its own mapping of the arena, against a real daemon.

Worker A writes K/V token by token through the per-layer tensors; worker B attaches the
sequence and reads the same bytes through its own mapping; an eviction is seen by both
(EVICTED with the sequence id on their Watch streams); a pinned sequence is never
evicted; a defragment moves a split sequence into one run, both holders see MOVED and
read the same bytes at the new blocks, and a pinned sequence stays put; the three OOM strategies; a killed worker's sequences go back to the pool.
"""

from __future__ import annotations


import grpc
import pytest

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from tests.support.daemon import daemon_fixture
from tests.support.driven import DrivenProcess, WorkerError
from tests.support.wait import until, wait_until

# 2 layers x (K, V) x 2 heads x 8 x float32 = 256 bytes a token; 4 tokens a block;
# 64 blocks (256 tokens, 64 KiB) in the arena.
CONFIG = """
[devices]
host_capacity = "16MiB"

[sessions]
lease_seconds = 2.0

[[pools]]
name = "default"

[[pools]]
name = "kv"
[pools.kv]
num_layers = 2
num_kv_heads = 2
head_dim = 8
dtype = "float32"
block_tokens = 4
max_tokens = 256
"""

daemon = daemon_fixture(config=CONFIG)

class Worker(DrivenProcess):
    """A paged-pool worker process (tests/e2e/paged_worker.py) with its own session."""

    def __init__(self, target: str, grant_tokens: int = 16) -> None:
        super().__init__("tests.e2e.paged_worker", target, "kv", str(grant_tokens), name="paged worker")


@pytest.fixture
def workers(daemon):
    started: list[Worker] = []

    def start(grant_tokens: int = 16) -> Worker:
        started.append(Worker(daemon.target, grant_tokens))
        return started[-1]

    yield start
    for worker in started:
        worker.close()


def block_map(daemon) -> pb.BlockMapResponse:
    with grpc.insecure_channel(daemon.target) as channel:
        return broker_pb2_grpc.CacheBrokerStub(channel).BlockMap(pb.BlockMapRequest(pool="kv"))


def test_a_second_process_reads_what_the_first_wrote_token_by_token(daemon, workers):
    a, b = workers(), workers()
    assert a("allocate", seq="s", prompt=0, max_tokens=200) == 200
    wrote = a("write", seq="s", salt=7, tokens=50)
    assert wrote["used"] == 50
    # 50 tokens (13 blocks) in grants of up to 16 tokens beyond the need, scaled down as the
    # 64-block pool fills: the open, the allocate, at most one extension per 2 blocks and one
    # more (grants ahead go halfway through a grant, when fewer tokens were generated), the report
    assert wrote["rpcs"] <= 1 + 1 + 13 // 2 + 1 + 1, wrote
    assert b("attach", seq="s") == 50
    seen = b("check", seq="s", salt=7)
    assert seen == {"ok": True, "used": 50, "contiguous": True}
    assert a("check", seq="s", salt=7)["ok"]
    # A second sequence in between, then more tokens: s may leave its run (a gather)
    assert a("allocate", seq="t", prompt=0) == 0
    a("write", seq="t", salt=3, tokens=40)
    a("write", seq="s", salt=7, tokens=30)
    b("attach", seq="s")  # the new block table and the tokens reported
    assert b("check", seq="s", salt=7)["ok"] and b("check", seq="s", salt=7)["used"] == 80
    assert b("attach", seq="t") == 40 and b("check", seq="t", salt=3)["ok"]
    sequences = {s.sequence_id: s for s in block_map(daemon).sequences}
    assert sequences["s"].tokens_used == 80 and sequences["s"].holder_count == 2
    assert a("free", seq="s") is True and a("free", seq="s") is False  # idempotent


def test_an_eviction_is_seen_by_both_holders_and_a_pinned_sequence_is_not_evicted(daemon, workers):
    a, b, c = workers(), workers(), workers()
    a("allocate", seq="low", prompt=100, priority=0)
    a("write", seq="low", salt=1, tokens=4)
    b("attach", seq="low")
    a("pin", seq="low")
    with pytest.raises(WorkerError) as refused:  # pinned: not a victim even for a higher priority
        c("allocate", seq="high", prompt=200, priority=5)
    assert refused.value.kind == "OutOfTokens"
    a("pin", seq="low", pinned=False)
    c("allocate", seq="high", prompt=200, priority=5)
    wait_until(lambda: a("evicted", seq="low") and b("evicted", seq="low"), 10.0, "both holders learn of the eviction")
    with pytest.raises(WorkerError) as gone:
        b("check", seq="low", salt=1)
    assert gone.value.kind == "SequenceEvicted"
    assert [s.sequence_id for s in block_map(daemon).sequences] == ["high"]
    assert "evicted sequence low" in daemon.log()


def defragment(daemon, dry_run: bool = False) -> pb.DefragmentResponse:
    with grpc.insecure_channel(daemon.target) as channel:
        return broker_pb2_grpc.CacheBrokerStub(channel).Defragment(pb.DefragmentRequest(pool="kv", dry_run=dry_run))


def test_a_defragment_joins_a_split_sequence_and_both_holders_see_it_moved(daemon, workers):
    a, b = workers(grant_tokens=0), workers(grant_tokens=0)
    a("allocate", seq="s", prompt=0, max_tokens=200)
    a("write", seq="s", salt=5, tokens=8)  # blocks for 8 tokens
    b("allocate", seq="p", prompt=8, pinned=True)  # pinned, right after s
    b("allocate", seq="gap", prompt=8)
    split = a("write", seq="s", salt=5, tokens=12)["table"]  # s grows past p and gap: several runs
    b("free", seq="gap")
    assert split != list(range(split[0], split[0] + len(split))), split
    b("attach", seq="s")
    assert b("check", seq="s", salt=5) == {"ok": True, "used": 20, "contiguous": False}
    before = {s.sequence_id: [(r.first_block, r.count) for r in s.runs] for s in block_map(daemon).sequences}

    planned = defragment(daemon, dry_run=True)
    assert planned.dry_run and planned.caches_moved == 1 and planned.block_moves[0].sequence_id == "s"
    runs_now = {s.sequence_id: [(r.first_block, r.count) for r in s.runs] for s in block_map(daemon).sequences}
    assert runs_now == before and not a("moved", seq="s")  # a dry run moves nothing
    result = defragment(daemon)
    # p (pinned) keeps its blocks: s moves past it, the two blocks before p stay free
    assert result.caches_moved == 1 and result.fragmentation_after <= result.fragmentation_before, result
    assert result.paged and {m.sequence_id for m in result.block_moves} == {"s"} and not result.moves

    wait_until(lambda: a("moved", seq="s") and b("moved", seq="s"), 20.0, "both holders get MOVED for s")
    after = {s.sequence_id: [(r.first_block, r.count) for r in s.runs] for s in block_map(daemon).sequences}
    assert after["p"] == before["p"], "the pinned sequence moved"
    assert len(after["s"]) == 1 and after["s"] != before["s"]
    table = b("table", seq="s")
    assert table == list(range(after["s"][0][0], after["s"][0][0] + after["s"][0][1]))
    assert b("check", seq="s", salt=5) == {"ok": True, "used": 20, "contiguous": True}  # the same bytes, moved
    assert a("check", seq="s", salt=5) == {"ok": True, "used": 20, "contiguous": True}
    a("write", seq="s", salt=5, tokens=4)  # appends go to the new blocks
    b("attach", seq="s")
    assert b("check", seq="s", salt=5) == {"ok": True, "used": 24, "contiguous": True}
    assert "paged pool kv: defragmented, 1 sequences moved" in daemon.log()


def test_oom_strategies_reject_reduce_and_wait(daemon, workers):
    a, b = workers(), workers()
    a("allocate", seq="big", prompt=200)
    with pytest.raises(WorkerError) as rejected:
        b("allocate", seq="r", prompt=100)
    assert rejected.value.kind == "OutOfTokens"
    assert "100 tokens requested, 56 tokens free" in str(rejected.value)
    assert b("allocate", seq="reduced", prompt=10, max_tokens=1000, on_oom="reduce") == 56  # all that was free
    with pytest.raises(WorkerError) as timed_out:
        b("allocate", seq="w", prompt=100, on_oom="wait", timeout=0.2)
    assert timed_out.value.kind == "AllocationTimeout"
    b.send("allocate", seq="w", prompt=100, on_oom="wait", timeout=60)
    wait_until(lambda: "sequence w waits up to 5" in daemon.log() or "sequence w waits up to 6" in daemon.log(),
               30.0, "the second wait is queued")  # fmt: skip
    a("free", seq="big")
    assert b.reply("the waiting allocation") == 0
    assert {s.sequence_id for s in block_map(daemon).sequences} == {"reduced", "w"}


def test_a_killed_workers_sequences_go_back_to_the_pool(daemon, workers):
    a = workers()
    a("allocate", seq="doomed", prompt=120)
    assert block_map(daemon).stats.blocks_used == 30  # 120 tokens (no headroom at allocation)
    a.kill()
    wait_until(lambda: block_map(daemon).stats.blocks_used == 0, 10.0, "the killed worker's blocks are free")
    assert block_map(daemon).block_map == "." * 64


@pytest.mark.parametrize(
    "method, request_, code, text",
    [
        ("OpenPagedPool", pb.OpenPagedPoolRequest(pool="default"), grpc.StatusCode.NOT_FOUND, "not a paged pool"),
        ("OpenPagedPool", pb.OpenPagedPoolRequest(), grpc.StatusCode.INVALID_ARGUMENT, "pool"),
        ("AllocateSequence", pb.AllocateSequenceRequest(pool="kv"), grpc.StatusCode.INVALID_ARGUMENT, "sequence_id"),
        ("AllocateSequence", pb.AllocateSequenceRequest(pool="kv", sequence_id="bad id!"),
         grpc.StatusCode.INVALID_ARGUMENT, "sequence_id"),
        ("AllocateSequence", pb.AllocateSequenceRequest(pool="kv", sequence_id="a", on_oom=9),
         grpc.StatusCode.INVALID_ARGUMENT, "on_oom"),
        ("AllocateSequence", pb.AllocateSequenceRequest(pool="kv", sequence_id="a", on_oom=pb.OOM_STRATEGY_REDUCE),
         grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ("AllocateSequence", pb.AllocateSequenceRequest(pool="kv", sequence_id="a", prompt_tokens=20, max_tokens=10),
         grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ("AllocateSequence", pb.AllocateSequenceRequest(pool="kv", sequence_id="a", prompt_tokens=2**50),
         grpc.StatusCode.INVALID_ARGUMENT, "prompt_tokens"),
        ("AllocateSequence", pb.AllocateSequenceRequest(pool="kv", sequence_id="a", prompt_tokens=300),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "the pool holds 256 tokens in all"),
        ("ExtendSequence", pb.ExtendSequenceRequest(pool="kv", sequence_id="nope", tokens_needed=1),
         grpc.StatusCode.NOT_FOUND, "no sequence"),
        ("PinSequence", pb.PinSequenceRequest(pool="kv", sequence_id="nope"), grpc.StatusCode.NOT_FOUND, "no sequence"),
        ("BlockMap", pb.BlockMapRequest(pool="nope"), grpc.StatusCode.NOT_FOUND, "not a paged pool"),
    ],
)
def test_bad_requests_get_clear_errors(daemon, method, request_, code, text):
    with grpc.insecure_channel(daemon.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            getattr(broker_pb2_grpc.CacheBrokerStub(channel), method)(request_)
    assert caught.value.code() == code and text in caught.value.details(), caught.value.details()
    assert block_map(daemon).stats.blocks_used == 0


def test_another_session_may_not_free_a_sequence_it_does_not_hold(daemon, workers):
    a, b = workers(), workers()
    a("allocate", seq="mine", prompt=4)
    with pytest.raises(WorkerError) as refused:
        b("free", seq="mine")
    assert refused.value.kind == "PreconditionFailed" and "not held by this caller" in str(refused.value)
    assert [s.sequence_id for s in block_map(daemon).sequences] == ["mine"]


def test_the_async_pool_allocates_appends_reads_and_frees(daemon, workers):
    import asyncio

    import torch

    from kvbroker_client import AsyncBrokerClient, OutOfTokens, SequenceEvicted
    from tests.e2e.paged_worker import expected

    async def scenario() -> None:
        async with AsyncBrokerClient(daemon.target) as client:
            pool = await client.paged_pool("kv", grant_tokens=16)
            lay = pool.layout
            assert await pool.allocate_for("aio", 0, max_tokens=100, priority=0) == 100
            for t in range(30):
                where = await pool.append_token("aio")
                for layer in range(lay.num_layers):
                    flat = pool.layer(layer).view(2, -1, lay.num_kv_heads, lay.head_dim)
                    for kv in (0, 1):
                        flat[kv, where.slot] = expected(9, layer, kv, t + 1, lay.num_kv_heads, lay.head_dim)[t]
            slots = await pool.append_tokens("aio", 0)
            assert slots == [] and pool.tokens_used("aio") == 30
            await pool.report("aio")
            assert torch.equal(pool.k_view("aio", 1)[:30], expected(9, 1, 0, 30, lay.num_kv_heads, lay.head_dim))
            stats = await pool.stats()
            assert stats["sequences"] == 1 and stats["tokens_used"] == 30
            assert "aio: 30/" in await pool.dump_cache_stats()
            with pytest.raises(OutOfTokens):
                await pool.allocate_for("huge", 1000)
            # Another process's higher-priority sequence evicts it: the event reaches the loop.
            evicted = asyncio.Event()
            client.sequence_listeners.append(lambda event: event.sequence_id == "aio" and evicted.set())
            # (in threads: a blocked loop would miss its heartbeats and lose its session)
            w = await asyncio.to_thread(workers)
            await asyncio.to_thread(w, "allocate", seq="vip", prompt=256, priority=5)
            await asyncio.wait_for(evicted.wait(), 20)  # the listener runs after the pool's own
            assert pool.evicted("aio")
            with pytest.raises(SequenceEvicted):
                await pool.append_token("aio")
            assert await pool.free_for("aio") is False
            assert await asyncio.to_thread(w, "free", seq="vip") is True

    asyncio.run(scenario())


def test_the_async_pool_re_reads_a_moved_sequence(daemon, workers):
    import asyncio

    import torch

    from kvbroker_client import AsyncBrokerClient, SequenceMoved
    from tests.e2e.paged_worker import expected

    async def scenario() -> None:
        async with AsyncBrokerClient(daemon.target) as client:
            pool = await client.paged_pool("kv", grant_tokens=0)
            lay = pool.layout
            w = await asyncio.to_thread(workers)
            await pool.allocate_for("x", 0)

            async def write(n: int) -> None:
                for _ in range(n):
                    where = await pool.append_token("x")
                    t = pool.tokens_used("x") - 1
                    for layer in range(lay.num_layers):
                        flat = pool.layer(layer).view(2, -1, lay.num_kv_heads, lay.head_dim)
                        for kv in (0, 1):
                            flat[kv, where.slot] = expected(4, layer, kv, t + 1, lay.num_kv_heads, lay.head_dim)[t]

            await write(4)
            await asyncio.to_thread(w, "allocate", seq="y", prompt=4)  # the block right after x
            await write(4)  # x's next block lies past y
            await asyncio.to_thread(w, "free", seq="y")
            assert not pool.is_contiguous("x")
            result = await asyncio.to_thread(defragment, daemon)
            assert result.caches_moved == 1
            await until(lambda: pool.moved("x"), timeout=20, what="the pool learns x moved", interval=0.01)
            with pytest.raises(SequenceMoved):
                pool.k_view("x", 0)
            await pool.refresh("x")
            assert pool.is_contiguous("x") and pool.tokens_used("x") == 8
            for layer in range(lay.num_layers):
                assert torch.equal(pool.k_view("x", layer), expected(4, layer, 0, 8, lay.num_kv_heads, lay.head_dim))
                assert torch.equal(pool.v_view("x", layer), expected(4, layer, 1, 8, lay.num_kv_heads, lay.head_dim))
            await write(1)  # appends go on in the new run
            assert pool.block_table("x") == list(range(pool.block_table("x")[0], pool.block_table("x")[0] + 3))
            assert await pool.free_for("x") is True

    asyncio.run(scenario())
