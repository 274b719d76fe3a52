"""``kvbroker ls``: caches with their holders and pins, sorted, limited, or summed per
model or pool (like ``ray memory``'s summaries).

The broker pages caches in id order; sorting and grouping happen here, over every page
(an operator's query: one ListCaches call per 1000 caches).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from kvbroker.cli.formatting import format_age, format_bytes, render_table, seconds_of
from kvbroker.v1 import broker_pb2 as pb

#: ``--sort`` keys: biggest first; oldest first; longest unused first (eviction's view).
SORTS: dict[str, Callable[[pb.Cache], Any]] = {
    "size": lambda c: (-c.nbytes, c.cache_id),
    "age": lambda c: (seconds_of(c.created_at), c.cache_id),
    "last-used": lambda c: (seconds_of(c.last_access_at), c.cache_id),
}
GROUPS = ("model", "pool")


def state_name(state: int) -> str:
    return pb.CacheState.Name(state).removeprefix("CACHE_STATE_").lower() if state in pb.CacheState.values() else "?"


def holder_name(holder: str) -> str:
    """A holder as people read it: a session id, ``~name`` (principal name's calls
    without a session) or ``(no session)`` for the anonymous holder."""
    return holder or "(no session)"


def _view_of(cache: pb.Cache) -> str:
    if cache.dtype == pb.DTYPE_UNSPECIFIED:
        return "-"
    name = pb.Dtype.Name(cache.dtype).removeprefix("DTYPE_").lower() if cache.dtype in pb.Dtype.values() else "?"
    return f"{name}[{','.join(map(str, cache.shape))}]"


def select(caches: Sequence[pb.Cache], sort: str | None, limit: int | None) -> list[pb.Cache]:
    """``caches`` in ``sort`` order (id order when None), at most ``limit`` of them."""
    ordered = sorted(caches, key=SORTS[sort]) if sort else list(caches)
    return ordered[:limit] if limit else ordered


def render_caches(caches: Sequence[pb.Cache], *, now: float | None = None, matched: int | None = None) -> str:
    """The ``kvbroker ls`` text: one row per cache, then a total line. ``matched``: how
    many caches matched before ``--limit`` (the total line says so when more). The
    HELD BY column appears when the broker named the holders (callers with the list
    right); AGE and IDLE are durations since creation and since the last attach or pin."""
    if not caches:
        return "no caches"
    now = time.time() if now is None else now
    named = any(c.holders for c in caches)
    headers = ["CACHE ID", "POOL", "MODEL", "DEVICE", "SIZE", "STATE", "PINS", "HOLDERS", "RETAIN",
               "PRIORITY", "VIEW", "EPOCH", "AGE", "IDLE"] + (["HELD BY"] if named else [])  # fmt: skip
    rows = []
    for c in caches:
        row = [c.cache_id, c.pool, c.model_name or "-", c.device, format_bytes(c.nbytes), state_name(c.state),
               str(c.pin_count), str(c.holder_count), "yes" if c.retain else "no", str(c.priority), _view_of(c),
               str(c.epoch), format_age(c.created_at, now), format_age(c.last_access_at, now)]  # fmt: skip
        if named:
            row.append(",".join(holder_name(h) for h in c.holders) or "-")
        rows.append(row)
    states: dict[str, int] = {}
    for c in caches:
        states[state_name(c.state)] = states.get(state_name(c.state), 0) + 1
    noun = "cache" if len(caches) == 1 else "caches"
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    total = f"{len(caches)} {noun}, {format_bytes(sum(c.nbytes for c in caches))} ({by_state})"
    if matched is not None and matched > len(caches):
        total += f"; {matched - len(caches)} more not shown (--limit)"
    return render_table(headers, rows, "llllrlrrlrlrrrl") + "\n\n" + total


class Group(NamedTuple):
    """The caches of one model or pool, summed (``ls --group-by``)."""

    name: str
    caches: int
    nbytes: int
    pinned: int
    pinned_bytes: int
    idle_retained: int
    evicted: int
    holders: int  # distinct holders named (0 when the broker did not name them)


def group(caches: Sequence[pb.Cache], by: str) -> list[Group]:
    """Sum ``caches`` per ``by`` (``"model"`` or ``"pool"``), biggest first."""
    members: dict[str, list[pb.Cache]] = {}
    for c in caches:
        members.setdefault(c.model_name if by == "model" else c.pool, []).append(c)
    groups = [
        Group(
            name, len(cs), sum(c.nbytes for c in cs), sum(c.pin_count > 0 for c in cs),
            sum(c.nbytes for c in cs if c.pin_count), sum(c.retain and not c.holder_count for c in cs),
            sum(c.state == pb.CACHE_STATE_EVICTED for c in cs), len({h for c in cs for h in c.holders}),
        )
        for name, cs in members.items()
    ]  # fmt: skip
    return sorted(groups, key=lambda g: (-g.nbytes, g.name))


def render_groups(groups: Sequence[Group], by: str) -> str:
    """The ``kvbroker ls --group-by`` text: one row per model or pool, then the total."""
    if not groups:
        return "no caches"
    rows = [
        [g.name or "-", str(g.caches), format_bytes(g.nbytes), str(g.pinned), format_bytes(g.pinned_bytes),
         str(g.idle_retained), str(g.evicted), str(g.holders) if any(x.holders for x in groups) else "-"]
        for g in groups
    ]  # fmt: skip
    caches, nbytes = sum(g.caches for g in groups), sum(g.nbytes for g in groups)
    pinned = sum(g.pinned_bytes for g in groups)
    headers = (by.upper(), "CACHES", "SIZE", "PINNED", "PINNED SIZE", "IDLE RETAINED", "EVICTED", "HOLDERS")
    total = f"{len(groups)} {by}{'s' if len(groups) != 1 else ''}, {caches} caches, {format_bytes(nbytes)}"
    return render_table(headers, rows, "lrrrrrrr") + f"\n\n{total} ({format_bytes(pinned)} pinned)"


def groups_json(groups: Sequence[Group], by: str) -> dict[str, Any]:
    """``ls --group-by --json``: plain JSON numbers (this view is the CLI's, not a proto
    message's), biggest group first."""
    return {
        "group_by": by,
        "groups": [
            {by: g.name, "caches": g.caches, "bytes": g.nbytes, "pinned_caches": g.pinned,
             "pinned_bytes": g.pinned_bytes, "idle_retained_caches": g.idle_retained,
             "evicted_caches": g.evicted, "holders": g.holders}
            for g in groups
        ],
    }  # fmt: skip
