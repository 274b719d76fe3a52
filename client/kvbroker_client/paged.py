"""``PagedPool``: a paged KV pool of the broker, mapped once, seen as per-layer tensors.

    pool = client.paged_pool("llama")            # maps the arena (one mmap / CUDA IPC open)
    pool.allocate_for("req-1", prompt_tokens=100, max_tokens=2048)
    k = pool.k_view("req-1", layer=0)            # (tokens, num_kv_heads, head_dim), no copy
    where = pool.append_token("req-1")           # Slot(block_id, offset, slot): no RPC
    pool.layer(0)[0].view(-1, H, D)[where.slot] = k_new   # K of layer 0 for that token
    pool.free_for("req-1")                       # idempotent

The arena's layout is vLLM's FlashAttention one: ``layer(i)`` is a tensor of shape
``(2, num_blocks, block_tokens, num_kv_heads, head_dim)`` (K then V) over the broker's
memory, layer ``i`` at ``i * layer_bytes`` of the arena. Token ``t`` of a sequence lives
in block ``block_table(seq)[t // block_tokens]``, offset ``t % block_tokens``, slot
``block * block_tokens + offset`` (vLLM's ``slot_mapping``).

**RPCs per token.** The client holds each sequence's block table. ``append_token`` costs
no RPC while the token falls in a block already granted; halfway through its blocks it
sends, without waiting, a grant for the next ``grant_tokens`` tokens' blocks
(``DEFAULT_GRANT_TOKENS`` = 512: at most 32 blocks of 16; grants start at one block and
double as the sequence generates, so about 5 RPCs per 1,000 tokens in a pool with room),
and takes its answer when the blocks run out (``kvbroker_client.paged_grants``). The broker
scales each grant by the pool's free fraction (``kvbroker.core.paged.PagedArena.headroom``:
half of it when half the blocks are free), so that headroom holds little of a nearly
full arena; appends then cost more RPCs. ``allocate_for`` asks for the prompt's blocks
only: headroom at arrival is what a burst of arrivals would pin down unused. The broker
learns ``tokens_used`` at each grant (or ``report``).

**Views.** ``k_view``/``v_view`` are zero-copy when the sequence's blocks are one run
(the broker keeps sequences in runs where it can: best fit, extension in place), and a
*gather* otherwise: a new tensor, ``tokens x num_kv_heads x head_dim x itemsize`` bytes
copied (``index_select`` over the block table), that later writes do not reach.

A sequence the broker evicted (a higher-priority sequence needed its blocks) raises
``SequenceEvicted`` on its next use; the Watch stream's EVICTED event (``sequence_id``
set) tells the pool at once. When the client's session is lost, the broker freed the
session's sequences: every later use raises ``SessionLost``.

A sequence the broker *moved* (``kvbroker defrag --pool P``: its blocks now form one run)
arrives as a MOVED event with ``sequence_id``: the pool drops its block table, and the
next append, view or ``block_table`` of that sequence re-reads it (one AttachSequence
RPC; tokens appended locally are kept). Writes into an unpinned sequence's blocks while
a defragment copies them may be lost: pin a sequence while writing it, or defragment
while writers are idle (``kvbroker.engine.paged``).

Thread-safety: one pool per thread, or a lock around it (appends mutate local state).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, NamedTuple

from kvbroker.kvlayout import KvLayout
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.wire import DTYPE_BY_VALUE
from kvbroker_client.errors import CacheEvicted, CacheExhausted, CacheNotFound, InvalidRequest, KvBrokerError, SessionLost
from kvbroker_client.paged_arena import layer_views, map_arena, populate
from kvbroker_client.paged_format import format_block_map, format_cache_stats
from kvbroker_client.paged_grants import Sequence as _Sequence
from kvbroker_client.paged_grants import ahead_request, extends

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_GRANT_TOKENS", "OutOfTokens", "PagedPool", "SequenceEvicted", "SequenceMoved", "Slot"]

#: Tokens asked for beyond the need when a sequence's blocks are full (tunable per pool).
DEFAULT_GRANT_TOKENS = 512
OOM_STRATEGIES = {"reject": pb.OOM_STRATEGY_REJECT, "reduce": pb.OOM_STRATEGY_REDUCE, "wait": pb.OOM_STRATEGY_WAIT}
#: An operation as a generator: it yields ``(method, request, extra_ms)`` and is sent the
#: response, so that the sync pool and ``AsyncPagedPool`` run the same code.
Plan = Generator[tuple[str, Any, int], Any, Any]


class OutOfTokens(CacheExhausted):
    """The paged pool has not the blocks a sequence needs (RESOURCE_EXHAUSTED).
    ``tokens_requested`` and ``tokens_free`` are the broker's figures."""

    tokens_requested: int = 0
    tokens_free: int = 0

    @classmethod
    def of(cls, err: CacheExhausted) -> CacheExhausted:
        """``err`` as an ``OutOfTokens`` when the broker's message is a paged refusal
        ("out of tokens: N tokens requested, M tokens free")."""
        text = err.message
        if not text.startswith("out of tokens: "):
            return err
        numbers = [int(word) for word in text.replace(",", " ").split() if word.isdigit()]
        typed = cls(text, err.code)
        typed.rpc_error = err.rpc_error
        typed.tokens_requested, typed.tokens_free = (numbers + [0, 0])[:2]
        return typed


class SequenceEvicted(CacheEvicted):
    """The broker evicted this sequence: its blocks belong to others now."""


class SequenceMoved(CacheNotFound):
    """(Async pool) the broker moved this sequence: ``await pool.refresh(seq_id)``."""


class Slot(NamedTuple):
    """Where a token goes: ``block_id``, ``offset`` in the block, ``slot`` in the
    layer's flattened ``(num_blocks * block_tokens)`` token axis."""

    block_id: int
    offset: int
    slot: int


class PagedPool:
    """A paged pool of ``client`` (see the module docstring). Built by
    ``BrokerClient.paged_pool``.

    Args:
        grant_tokens: tokens asked for beyond the need at each grant (RPC amortization).
        populate: touch every page of the arena on map (host arenas; the seed's
            ``warmup()`` in the worker), so that no first write of a token faults.
    """

    def __init__(self, client: Any, pool: str, *, grant_tokens: int = DEFAULT_GRANT_TOKENS, populate: bool = False,
                 _opened: pb.OpenPagedPoolResponse | None = None) -> None:  # fmt: skip
        if isinstance(grant_tokens, bool) or not isinstance(grant_tokens, int) or grant_tokens < 0:
            raise InvalidRequest(f"grant_tokens: must be a non-negative integer, got {grant_tokens!r}")
        self._client = client
        self.pool = pool
        self.grant_tokens = grant_tokens
        self.rpc_count = 0
        self.rpc_seconds = 0.0  # wall time spent waiting on this pool's RPCs (for measurements)
        self.grants_ahead = 0  # grants sent without waiting (counted in rpc_count too)
        response = _opened or self._call("OpenPagedPool", pb.OpenPagedPoolRequest(pool=pool))
        lay = response.layout
        self.layout = KvLayout(lay.num_layers, lay.num_kv_heads, lay.head_dim, DTYPE_BY_VALUE[lay.dtype].name,
                               lay.block_tokens)  # fmt: skip
        self.num_blocks = response.num_blocks
        self.arena_id = response.arena.cache_id
        self._generation = client.core.generation
        self._handle = response.handle
        self._seqs: dict[str, _Sequence] = {}
        self._evicted: set[str] = set()
        self._moved: dict[str, _Sequence] = {}  # moved by the broker: table to re-read
        self._arena = map_arena(response.handle)
        self._layers = layer_views(self._arena, self.layout, self.num_blocks)
        self.populate_seconds = self.warmup() if populate else 0.0
        client.sequence_listeners.append(self._on_event)

    # -- the arena ------------------------------------------------------------------------

    def layer(self, index: int) -> torch.Tensor:
        """Layer ``index``'s ``(2, num_blocks, block_tokens, num_kv_heads, head_dim)``
        tensor over the broker's memory (K is ``[0]``, V ``[1]``)."""
        return self._layers[index]

    def warmup(self) -> float:
        """Map every page of the arena into this process now (the seed's ``warmup()``),
        so that no first write of a token takes a page fault; returns the seconds it
        took. Host arenas: ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+; the bytes are
        untouched), else a read of one byte per page. The daemon already backs every
        host page at creation, so only this process's page tables are filled. A no-op
        on CUDA arenas (device memory is resident)."""
        started = time.perf_counter()
        populate(self._arena)
        return time.perf_counter() - started

    # -- sequences --------------------------------------------------------------------------

    def allocate_for(
        self, seq_id: str, prompt_tokens: int, max_tokens: int | None = None, *, on_oom: str = "reject",
        timeout: float | None = None, priority: int | None = None, pinned: bool = False,
    ) -> int:  # fmt: skip
        """Reserve blocks for a sequence's ``prompt_tokens`` (written by the prefill:
        they count as used) and headroom; it may grow later up to ``max_tokens`` (None:
        the pool). Returns the sequence's ``max_tokens`` as granted (``on_oom="reduce"``
        may lower it; 0 means no limit).

        ``on_oom``: ``"reject"`` raises ``OutOfTokens`` at once; ``"reduce"`` reserves
        all of ``max_tokens`` now, or the largest ``max_tokens`` that fits; ``"wait"``
        waits up to ``timeout`` seconds for blocks (``AllocationTimeout`` after).
        """
        return self._run(self._allocated(seq_id, prompt_tokens, max_tokens, on_oom, timeout, priority, pinned))

    def _allocated(self, seq_id: str, prompt_tokens: int, max_tokens: int | None, on_oom: str, timeout: float | None,
                   priority: int | None, pinned: bool) -> Plan:  # fmt: skip
        if on_oom not in OOM_STRATEGIES:
            raise InvalidRequest(f"on_oom: must be one of {', '.join(OOM_STRATEGIES)}, got {on_oom!r}")
        wait_ms = 0 if timeout is None else max(0, round(timeout * 1000))
        limit = max_tokens or 0
        request = pb.AllocateSequenceRequest(
            pool=self.pool, sequence_id=seq_id, prompt_tokens=prompt_tokens, max_tokens=limit,
            tokens_wanted=prompt_tokens, pinned=pinned, on_oom=OOM_STRATEGIES[on_oom],
            wait_timeout_ms=wait_ms, priority=priority,
        )  # fmt: skip
        seq = (yield ("AllocateSequence", request, wait_ms)).sequence
        self._evicted.discard(seq_id)
        self._seqs[seq_id] = self._new_sequence(seq, prompt_tokens)
        return seq.max_tokens

    def append_token(self, seq_id: str) -> Slot:
        """Where the sequence's next token goes. No RPC inside granted blocks; halfway
        through them the next grant is sent without waiting (``paged_grants``), and an
        append waits only when the blocks run out before its answer is in. Raises
        ``OutOfTokens`` (blocks full, none to grant: the seed's ``appendToken`` returning
        false), ``InvalidRequest`` past ``max_tokens``."""
        seq = self._seqs.get(seq_id) or self._missing(seq_id)
        t = seq.used
        if t >= seq.check_at:
            self._look(seq_id, seq, t + 1)
        bt = self.layout.block_tokens
        index = t // bt
        block = seq.table[index]
        seq.used = t + 1
        offset = t - index * bt
        return Slot(block, offset, block * bt + offset)

    def append_tokens(self, seq_id: str, n: int) -> list[Slot]:
        """``n`` tokens' slots at once (one RPC at most, for all the blocks they need)."""
        seq = self._seqs.get(seq_id) or self._missing(seq_id)
        if n < 0:
            raise InvalidRequest(f"n: must be non-negative, got {n}")
        if seq.used + n > seq.check_at:
            self._look(seq_id, seq, seq.used + n)
        return self._slots(seq, n)

    def _look(self, seq_id: str, seq: _Sequence, needed: int) -> None:
        """An append's slow path: take the grant ahead if it arrived (wait for it if the
        blocks ran out), grow now if still short, send the next grant ahead."""
        bt, length = self.layout.block_tokens, len(seq.table)
        if seq.pending is not None and (needed > seq.capacity(bt) or seq.pending.done()):
            self._take_ahead(seq)
        if needed > seq.capacity(bt):
            self._run(self._grow(seq_id, seq, needed))
        self._send_ahead(seq_id, seq, length, self._client.begin)

    def _send_ahead(self, seq_id: str, seq: _Sequence, length: int, start: Any) -> None:
        """Send the grant ahead if one is due, through ``start`` (plan -> what is pending:
        a future or a task), then plan the next look. Only from the halfway point of a
        table (``length`` still the table's): a new table plans its own."""
        bt = self.layout.block_tokens
        request = ahead_request(self.pool, seq_id, seq, bt, self.grant_tokens) if len(seq.table) == length else None
        if request is not None and self._client.core.generation == self._generation:
            self.rpc_count += 1
            self.grants_ahead += 1
            seq.pending = start(_plan(self._client.core.call("ExtendSequence", request)))
        seq.replan(bt)

    def _take_ahead(self, seq: _Sequence) -> None:
        """Wait for the grant ahead in flight and take its blocks. A failed one changes
        nothing: the grant that follows asks again, and its error is the caller's."""
        pending, seq.pending = seq.pending, None
        started = time.perf_counter()
        try:
            self._took_ahead(seq, pending.result())
        except KvBrokerError:
            seq.replan(self.layout.block_tokens)
        finally:
            self.rpc_seconds += time.perf_counter() - started

    def _took_ahead(self, seq: _Sequence, response: pb.SequenceResponse) -> None:
        if self._client.core.generation == self._generation and extends(seq, response.sequence):
            seq.set_table(response.sequence, self.layout.block_tokens, needed=0)

    def _new_sequence(self, view: pb.Sequence, used: int) -> _Sequence:
        seq = _Sequence([], used, view.max_tokens, view.pinned)
        seq.set_table(view, self.layout.block_tokens)
        return seq

    def _slots(self, seq: _Sequence, n: int) -> list[Slot]:
        bt = self.layout.block_tokens
        start, seq.used = seq.used, seq.used + n
        return [Slot(seq.table[t // bt], t % bt, seq.table[t // bt] * bt + t % bt) for t in range(start, start + n)]

    def free_for(self, seq_id: str) -> bool:
        """Give the sequence's blocks back; False when it was gone already (a second
        call is a no-op, as the seed's ``freeFor``). A grant ahead in flight is waited
        for first, so that it cannot land on a sequence of the same id made later."""
        seq = self._seqs.get(seq_id) or self._moved.get(seq_id)
        if seq is not None and seq.pending is not None:
            pending, seq.pending = seq.pending, None
            with contextlib.suppress(KvBrokerError):
                pending.result()
        return self._run(self._freed(seq_id))

    def _freed(self, seq_id: str) -> Plan:
        self._seqs.pop(seq_id, None)
        self._moved.pop(seq_id, None)
        self._evicted.discard(seq_id)
        return (yield ("FreeSequence", pb.FreeSequenceRequest(pool=self.pool, sequence_id=seq_id), 0)).freed

    def attach(self, seq_id: str) -> int:
        """Hold another process's sequence and load its block table; returns its tokens
        as last reported (``report`` on the writer's side)."""
        return self._run(self._attached(seq_id))

    def _attached(self, seq_id: str) -> Plan:
        seq = (yield ("AttachSequence", pb.AttachSequenceRequest(pool=self.pool, sequence_id=seq_id), 0)).sequence
        self._evicted.discard(seq_id)
        self._moved.pop(seq_id, None)
        self._seqs[seq_id] = self._new_sequence(seq, seq.tokens_used)
        return seq.tokens_used

    def report(self, seq_id: str) -> None:
        """Tell the broker the tokens written so far (one RPC), for an attached reader
        and for ``kvbroker ls``. A grant ahead in flight is taken first: it carries an
        older count, which must not land after this one."""
        seq = self._seqs.get(seq_id)
        if seq is not None and seq.pending is not None:
            self._take_ahead(seq)
        self._run(self._reported(seq_id))

    def _reported(self, seq_id: str) -> Plan:
        seq = self._seqs.get(seq_id) or self._missing(seq_id)
        request = pb.ExtendSequenceRequest(pool=self.pool, sequence_id=seq_id, tokens_used=seq.used,
                                           tokens_needed=seq.used, tokens_wanted=seq.used)  # fmt: skip
        yield ("ExtendSequence", request, 0)

    def pin(self, seq_id: str, pinned: bool = True) -> None:
        """Pin (never evicted) or unpin a sequence."""
        self._run(self._pinned(seq_id, pinned))

    def _pinned(self, seq_id: str, pinned: bool) -> Plan:
        seq = self._seqs.get(seq_id) or self._missing(seq_id)
        yield ("PinSequence", pb.PinSequenceRequest(pool=self.pool, sequence_id=seq_id, pinned=pinned), 0)
        seq.pinned = pinned

    def unpin(self, seq_id: str) -> None:
        self.pin(seq_id, False)

    # -- reading ----------------------------------------------------------------------------

    def block_table(self, seq_id: str) -> list[int]:
        return list((self._seqs.get(seq_id) or self._missing(seq_id)).table)

    def tokens_used(self, seq_id: str) -> int:
        return (self._seqs.get(seq_id) or self._missing(seq_id)).used

    def slot_mapping(self, seq_id: str) -> list[int]:
        """The slot of each of the sequence's tokens, in order (vLLM's ``slot_mapping``)."""
        seq = self._seqs.get(seq_id) or self._missing(seq_id)
        bt = self.layout.block_tokens
        return [seq.table[t // bt] * bt + t % bt for t in range(seq.used)]

    def is_contiguous(self, seq_id: str) -> bool:
        """Whether the sequence's blocks are one run (its views are then zero-copy)."""
        table = (self._seqs.get(seq_id) or self._missing(seq_id)).table
        return all(b == table[0] + i for i, b in enumerate(table))

    def k_view(self, seq_id: str, layer: int) -> torch.Tensor:
        """K of the sequence's used tokens in ``layer``: ``(tokens, num_kv_heads,
        head_dim)``; zero-copy when ``is_contiguous``, else a gathered copy."""
        return self._kv_view(seq_id, layer, 0)

    def v_view(self, seq_id: str, layer: int) -> torch.Tensor:
        """V, as ``k_view``."""
        return self._kv_view(seq_id, layer, 1)

    def _kv_view(self, seq_id: str, layer: int, kv: int) -> torch.Tensor:
        seq = self._seqs.get(seq_id) or self._missing(seq_id)
        lay = self.layout
        blocks = self._layers[layer][kv]  # (num_blocks, block_tokens, H, D)
        used_blocks = -(-seq.used // lay.block_tokens)
        table = seq.table[:used_blocks]
        if table and table[-1] - table[0] == len(table) - 1:
            run = blocks[table[0] : table[0] + len(table)]
        else:
            import torch

            run = blocks.index_select(0, torch.tensor(table, dtype=torch.long, device=blocks.device))
        return run.reshape(-1, lay.num_kv_heads, lay.head_dim)[: seq.used]

    # -- the pool's state (operators' figures) ---------------------------------------------

    def block_map(self) -> pb.BlockMapResponse:
        return self._call("BlockMap", pb.BlockMapRequest(pool=self.pool))

    def stats(self) -> dict[str, Any]:
        """The seed's statistics: sequences, bytes allocated and free, fragmentation,
        full; and tokens used, reserved and free."""
        return self.stats_of(self.block_map())

    def stats_of(self, reply: pb.BlockMapResponse) -> dict[str, Any]:
        """``stats()`` of a ``block_map()`` reply."""
        s = reply.stats
        per_block = self.layout.bytes_per_block
        return {
            "sequences": s.sequences, "total_allocated_bytes": s.blocks_used * per_block,
            "total_free_bytes": s.blocks_free * per_block, "fragmentation": s.fragmentation,
            "is_full": s.blocks_free == 0, "blocks_used": s.blocks_used, "blocks_free": s.blocks_free,
            "tokens_used": s.tokens_used, "tokens_reserved": s.tokens_reserved, "tokens_free": s.tokens_free,
        }  # fmt: skip

    def dump_cache_stats(self) -> str:
        """The seed's ``dumpCacheStats`` text (``kvbroker blocks`` prints the same)."""
        return format_cache_stats(self.pool, self.block_map())

    def dump_block_map(self) -> str:
        """The seed's ``dumpBlockMap``: ``X`` used, ``.`` free, 64 blocks a line."""
        return format_block_map(self.block_map())

    # -- internals --------------------------------------------------------------------------

    def _grow(self, seq_id: str, seq: _Sequence, needed: int) -> Plan:
        if seq.max_tokens and needed > seq.max_tokens:
            raise InvalidRequest(f"sequence {seq_id!r} would hold {needed} tokens, more than its max_tokens ({seq.max_tokens})")
        wanted = needed + self.grant_tokens
        request = pb.ExtendSequenceRequest(
            pool=self.pool, sequence_id=seq_id, tokens_used=seq.used, tokens_needed=needed,
            tokens_wanted=min(wanted, seq.max_tokens) if seq.max_tokens else wanted,
        )  # fmt: skip
        response = (yield ("ExtendSequence", request, 0)).sequence
        seq.set_table(response, self.layout.block_tokens, needed=needed)

    def _run(self, plan: Plan) -> Any:
        """Perform a plan's calls (``(method, request, extra_ms)``) one by one."""
        try:
            step = next(plan)
            while True:
                step = plan.send(self._call(*step))
        except StopIteration as stop:
            return stop.value

    def _missing(self, seq_id: str) -> _Sequence:
        if seq_id in self._moved:
            return self._run(self._refreshed(seq_id))
        return self._gone(seq_id)

    def _refreshed(self, seq_id: str) -> Plan:
        """Re-read a moved sequence's block table (the tokens appended here are kept)."""
        seq = self._moved[seq_id]
        view = (yield ("AttachSequence", pb.AttachSequenceRequest(pool=self.pool, sequence_id=seq_id), 0)).sequence
        seq.pending, seq.ahead_for = None, -1  # an answer for the old table: dropped
        seq.pinned, seq.used = view.pinned, max(seq.used, view.tokens_used)
        seq.set_table(view, self.layout.block_tokens)
        self._moved.pop(seq_id, None)
        self._seqs[seq_id] = seq
        return seq

    def moved(self, seq_id: str) -> bool:
        """Whether the broker moved the sequence and its table is not re-read yet."""
        return seq_id in self._moved

    def _gone(self, seq_id: str) -> _Sequence:
        self._check_session()
        if seq_id in self._evicted:
            raise SequenceEvicted(f"sequence {seq_id!r} was evicted by the broker: allocate it again")
        raise CacheNotFound(f"no sequence {seq_id!r} in this process (allocate_for or attach it)")

    def _check_session(self) -> None:
        if self._client.core.generation != self._generation:
            raise SessionLost("the broker session this paged pool was opened under is over: its sequences were freed")

    def _call(self, method: str, request: Any, extra_ms: int = 0) -> Any:
        if hasattr(self, "_generation"):
            self._check_session()
        self.rpc_count += 1
        core = self._client.core
        started = time.perf_counter()
        try:
            return self._client.drive(_plan(core.call(method, request, extra_ms)))
        except (CacheExhausted, CacheNotFound) as err:
            raise self._typed(err, request) from None
        finally:
            self.rpc_seconds += time.perf_counter() - started

    def _typed(self, err: CacheExhausted | CacheNotFound, request: Any) -> Exception:
        """``OutOfTokens`` for a paged refusal; ``SequenceEvicted`` for an evicted one's."""
        if isinstance(err, CacheExhausted):
            return OutOfTokens.of(err)
        seq_id = getattr(request, "sequence_id", "")
        if seq_id and seq_id in self._evicted:
            return SequenceEvicted(f"sequence {seq_id!r} was evicted by the broker: allocate it again")
        return err

    def _on_event(self, event: pb.WatchEvent) -> None:
        """Watch thread: a sequence of this pool was evicted or moved."""
        if event.cache_id == self.arena_id and event.kind == pb.EVENT_KIND_EVICTED:
            self._evicted.add(event.sequence_id)
            self._seqs.pop(event.sequence_id, None)
            self._moved.pop(event.sequence_id, None)
        elif event.cache_id == self.arena_id and event.kind == pb.EVENT_KIND_MOVED:
            seq = self._seqs.pop(event.sequence_id, None)
            if seq is not None:
                self._moved[event.sequence_id] = seq

    def evicted(self, seq_id: str) -> bool:
        """Whether the broker evicted the sequence (its EVICTED event arrived)."""
        return seq_id in self._evicted


def _plan(call: Any):
    return (yield call)


__all__ += ["format_block_map", "format_cache_stats"]
