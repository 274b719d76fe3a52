"""The paged-pool RPCs of ``CacheBroker``: decode, one ``PagedPools`` call, encode.

A mixin of ``CacheBrokerServicer`` (one service, one servicer), kept apart so that the
servicer module stays one screenful per concern. Rights: creating, extending, freeing
and pinning a sequence are ``allocate`` on the pool; opening the pool, attaching a
sequence and reading its block map are ``attach`` (they read what a mapping reads).
A servicer built without paged pools answers NOT_FOUND for every pool.
"""

from __future__ import annotations

from kvbroker.core.errors import NotFound
from kvbroker.core.paged import PagedStats, SequenceView
from kvbroker.engine.paged import BlockMap, PagedPools, PagedPoolSpec, PagedPoolView
from kvbroker.security import Action
from kvbroker.server import convert
from kvbroker.v1 import broker_pb2 as pb

_OOM = {pb.OOM_STRATEGY_UNSPECIFIED: "reject", pb.OOM_STRATEGY_REJECT: "reject",
        pb.OOM_STRATEGY_REDUCE: "reduce", pb.OOM_STRATEGY_WAIT: "wait"}  # fmt: skip


def layout_message(spec: PagedPoolSpec) -> pb.KvLayout:
    lay = spec.layout
    return pb.KvLayout(
        num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
        dtype=convert._dtype_value(lay.dtype), block_tokens=lay.block_tokens,
        bytes_per_token=lay.bytes_per_token, bytes_per_block=lay.bytes_per_block,
    )  # fmt: skip


def sequence_message(pool: str, view: SequenceView) -> pb.Sequence:
    return pb.Sequence(
        sequence_id=view.seq_id, pool=pool, runs=[pb.BlockRun(first_block=s, count=c) for s, c in view.runs],
        tokens_used=view.tokens_used, tokens_reserved=view.tokens_reserved, max_tokens=view.max_tokens,
        priority=view.priority, pinned=view.pinned, holder_count=len(view.holders),
    )  # fmt: skip


def paged_stats_message(spec: PagedPoolSpec, stats: PagedStats) -> pb.PagedPoolStats:
    return pb.PagedPoolStats(
        pool=spec.pool, layout=layout_message(spec), num_blocks=stats.num_blocks, blocks_used=stats.blocks_used,
        blocks_free=stats.blocks_free, sequences=stats.sequences, free_runs=stats.free_runs,
        largest_free_run=stats.largest_free_run, fragmentation=stats.fragmentation,
        tokens_used=stats.tokens_used, tokens_reserved=stats.tokens_reserved,
        tokens_free=stats.blocks_free * stats.block_tokens, pinned_sequences=stats.pinned_sequences,
    )  # fmt: skip


def open_message(view: PagedPoolView) -> pb.OpenPagedPoolResponse:
    spec = view.spec
    return pb.OpenPagedPoolResponse(
        pool=spec.pool, layout=layout_message(spec), num_blocks=spec.num_blocks,
        layer_bytes=spec.layout.layer_bytes(spec.num_blocks), arena=convert.cache_message(view.arena),
        handle=convert.handle_message(view.handle),
    )  # fmt: skip


def block_map_message(result: BlockMap) -> pb.BlockMapResponse:
    pool = result.spec.pool
    return pb.BlockMapResponse(
        stats=paged_stats_message(result.spec, result.stats), block_map=result.map,
        sequences=[sequence_message(pool, s) for s in result.sequences],
    )  # fmt: skip


def _count(field: str, value: int) -> int:
    if value > 2**40:
        raise convert.InvalidArgument(field, f"must be at most {2**40}, got {value}")
    return value


class PagedService:
    """The paged RPCs; mixed into ``CacheBrokerServicer`` (which sets ``_paged``,
    ``_gate`` and wraps each method in its error translation)."""

    _paged: PagedPools | None

    def _pools(self) -> PagedPools:
        if self._paged is None:
            raise NotFound("this broker has no paged pools (configure [pools.kv])")
        return self._paged

    async def _on_pool(self, context, action: Action, pool: str):
        caller = await self._gate.caller(context)  # type: ignore[attr-defined]
        pool = convert.required_id("pool", pool)
        self._gate.on_pool(caller, action, pool)  # type: ignore[attr-defined]
        return caller, pool

    async def _open_paged_pool(self, request: pb.OpenPagedPoolRequest, context) -> pb.OpenPagedPoolResponse:
        caller, pool = await self._on_pool(context, Action.ATTACH, request.pool)
        return open_message(await self._pools().open(pool, caller.holder))

    async def _allocate_sequence(self, request: pb.AllocateSequenceRequest, context) -> pb.SequenceResponse:
        caller, pool = await self._on_pool(context, Action.ALLOCATE, request.pool)
        if request.on_oom not in _OOM:
            raise convert.InvalidArgument("on_oom", f"unknown strategy {request.on_oom}")
        if request.wait_timeout_ms > convert.MAX_WAIT_TIMEOUT_MS:
            raise convert.InvalidArgument("wait_timeout_ms", f"must be at most {convert.MAX_WAIT_TIMEOUT_MS}")
        view = await self._pools().allocate(
            pool, convert.required_id("sequence_id", request.sequence_id), caller.holder,
            prompt_tokens=_count("prompt_tokens", request.prompt_tokens),
            max_tokens=_count("max_tokens", request.max_tokens),
            tokens_wanted=_count("tokens_wanted", request.tokens_wanted),
            priority=request.priority if request.HasField("priority") else 0, pinned=request.pinned,
            on_oom=_OOM[request.on_oom], wait_timeout_s=request.wait_timeout_ms / 1000,
        )  # fmt: skip
        return pb.SequenceResponse(sequence=sequence_message(pool, view))

    async def _extend_sequence(self, request: pb.ExtendSequenceRequest, context) -> pb.SequenceResponse:
        caller, pool = await self._on_pool(context, Action.ALLOCATE, request.pool)
        view = await self._pools().extend(
            pool, convert.required_id("sequence_id", request.sequence_id), caller.holder,
            tokens_used=_count("tokens_used", request.tokens_used),
            tokens_needed=_count("tokens_needed", request.tokens_needed),
            tokens_wanted=_count("tokens_wanted", request.tokens_wanted),
        )  # fmt: skip
        return pb.SequenceResponse(sequence=sequence_message(pool, view))

    async def _free_sequence(self, request: pb.FreeSequenceRequest, context) -> pb.FreeSequenceResponse:
        caller, pool = await self._on_pool(context, Action.ALLOCATE, request.pool)
        seq_id = convert.required_id("sequence_id", request.sequence_id)
        return pb.FreeSequenceResponse(freed=await self._pools().free(pool, seq_id, caller.holder))

    async def _attach_sequence(self, request: pb.AttachSequenceRequest, context) -> pb.SequenceResponse:
        caller, pool = await self._on_pool(context, Action.ATTACH, request.pool)
        view = await self._pools().attach(pool, convert.required_id("sequence_id", request.sequence_id), caller.holder)
        return pb.SequenceResponse(sequence=sequence_message(pool, view))

    async def _pin_sequence(self, request: pb.PinSequenceRequest, context) -> pb.SequenceResponse:
        caller, pool = await self._on_pool(context, Action.ALLOCATE, request.pool)
        seq_id = convert.required_id("sequence_id", request.sequence_id)
        view = await self._pools().pin(pool, seq_id, caller.holder, request.pinned)
        return pb.SequenceResponse(sequence=sequence_message(pool, view))

    async def _block_map(self, request: pb.BlockMapRequest, context) -> pb.BlockMapResponse:
        _, pool = await self._on_pool(context, Action.ATTACH, request.pool)
        return block_map_message(self._pools().block_map(pool))

    def _paged_stats(self) -> list[pb.PagedPoolStats]:
        if self._paged is None:
            return []
        return [paged_stats_message(self._paged.specs[name], s) for name, s in self._paged.stats().items()]
