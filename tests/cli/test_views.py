"""The CLI's pure parts: ls sorting, limits and summaries, the acting commands' reports,
the live view's screen and rates, and its usage errors and help pages (no broker)."""

from __future__ import annotations

import json
import math

import pytest

from kvbroker import cli
from kvbroker.cli import acting, caches, top
from kvbroker.cli.formatting import bar, format_rate, format_time
from kvbroker.cli.entry import COMMANDS, _parser
from kvbroker.v1 import broker_pb2 as pb

GiB, MiB = 1 << 30, 1 << 20
NOW = 1_800_000_000.0


def cache(cache_id: str, nbytes: int, *, created: float, used: float, pool: str = "p", model: str = "m",
          pins: int = 0, holders: tuple[str, ...] = (), retain: bool = False,
          state: int = pb.CACHE_STATE_RESIDENT) -> pb.Cache:  # fmt: skip
    c = pb.Cache(cache_id=cache_id, pool=pool, model_name=model, nbytes=nbytes, device="host", state=state,
                 pin_count=pins, pinned=pins > 0, holder_count=len(holders), holders=holders, retain=retain)  # fmt: skip
    c.created_at.FromNanoseconds(int(created * 1e9))
    c.last_access_at.FromNanoseconds(int(used * 1e9))
    return c


CACHES = [
    cache("a", 4 * MiB, created=NOW - 3600, used=NOW - 5, pool="vista", model="vista-7b", pins=1, holders=("py-1",)),
    cache("b", 64 * MiB, created=NOW - 60, used=NOW - 60, pool="ocr", model="ocr", holders=("py-1", "py-2")),
    cache("c", 16 * MiB, created=NOW - 7200, used=NOW - 600, pool="vista", model="vista-7b", retain=True),
    cache("d", MiB, created=NOW - 10, used=NOW - 10, pool="ocr", model="ocr", holders=("",)),
]


@pytest.mark.parametrize(
    ("sort", "order"),
    [(None, "abcd"), ("size", "bcad"), ("age", "cabd"), ("last-used", "cbda")],
)
def test_ls_sorts(sort, order):
    assert "".join(c.cache_id for c in caches.select(CACHES, sort, None)) == order
    assert "".join(c.cache_id for c in caches.select(CACHES, sort, 2)) == order[:2]


def test_ls_shows_age_idle_and_who_holds_each_cache():
    lines = caches.render_caches(caches.select(CACHES, "size", 3), now=NOW, matched=4).splitlines()
    assert lines[0].split()[-4:] == ["AGE", "IDLE", "HELD", "BY"]
    b, c, a = (line.split() for line in lines[1:4])
    assert b[-5:] == ["1m", "00s", "1m", "00s", "py-1,py-2"]
    assert c[-5:] == ["2h", "00m", "10m", "00s", "-"], "a retained cache nobody holds"
    assert a[-4:] == ["1h", "00m", "5s", "py-1"]
    assert lines[-1] == "3 caches, 84.0 MiB (3 resident); 1 more not shown (--limit)"
    anonymous = caches.render_caches([CACHES[3]], now=NOW).splitlines()[1]
    assert anonymous.endswith("(no session)")
    plain = caches.render_caches([cache("x", MiB, created=NOW, used=NOW)], now=NOW)
    assert "HELD BY" not in plain, "without holder ids (no list right), no empty column"


def test_ls_group_by_model_and_pool():
    groups = caches.group(CACHES, "pool")
    assert [(g.name, g.caches, g.nbytes, g.pinned, g.pinned_bytes, g.idle_retained, g.holders) for g in groups] == [
        ("ocr", 2, 65 * MiB, 0, 0, 0, 3), ("vista", 2, 20 * MiB, 1, 4 * MiB, 1, 1),
    ]  # fmt: skip
    text = caches.render_groups(caches.group(CACHES, "model"), "model").splitlines()
    assert text[0].split()[:4] == ["MODEL", "CACHES", "SIZE", "PINNED"]
    assert text[1].split()[:4] == ["ocr", "2", "65.0", "MiB"]
    assert text[-1] == "2 models, 4 caches, 85.0 MiB (4.00 MiB pinned)"
    data = caches.groups_json(groups, "pool")
    assert data["group_by"] == "pool" and data["groups"][1] == {
        "pool": "vista", "caches": 2, "bytes": 20 * MiB, "pinned_caches": 1, "pinned_bytes": 4 * MiB,
        "idle_retained_caches": 1, "evicted_caches": 0, "holders": 1,
    }  # fmt: skip


def test_times_rates_and_bars():
    stamp = pb.Cache().created_at
    assert format_time(stamp) == "-"
    stamp.FromSeconds(1_796_136_605)
    assert format_time(stamp) == "2026-12-01T14:50:05Z"
    assert [format_rate(x) for x in (0, 0.25, 12.5, 1234.0)] == ["0", "0.25/s", "12.5/s", "1234/s"]
    assert bar(100, 50, 20, width=10) == "[==###.....]"
    assert bar(100, 0, width=4) == "[....]" and bar(0, 0, width=4) == "[    ]"
    assert bar(100, 100, 100, width=4) == "[====]"


def test_reports_of_release_evict_and_pool_set():
    assert acting.render_release("k", True, False) == "cache k freed"
    assert "--force frees it" in acting.render_release("k", False, False)
    evicted = pb.EvictResponse(caches_evicted=2, bytes_evicted=8 * MiB, cache_ids=["a", "b"], caches_kept=1)
    assert acting.render_evict(evicted, "vista", False).splitlines() == [
        "evicted 2 caches (8.00 MiB) from pool vista; 1 kept (pinned or pending)", "  a, b",
    ]
    limits = pb.SetPoolLimitsResponse(
        pool="vista", before=pb.PoolLimits(max_bytes=8 * GiB, min_bytes=512 * MiB, priority=1),
        after=pb.PoolLimits(max_bytes=4 * GiB, min_bytes=512 * MiB, priority=5), caches_evicted=3,
        bytes_evicted=GiB, cache_ids=["x", "y", "z"], segments_retired=1, bytes_retired=2 * GiB,
        segments_draining=1, bytes_draining=2 * GiB,
    )  # fmt: skip
    assert acting.render_limits(limits).splitlines() == [
        "pool vista is now: max 8.00 GiB -> 4.00 GiB, min 512 MiB, priority 1 -> 5",
        "evicted 3 caches (1.00 GiB); 1 segment (2.00 GiB) went back to the device; "
        "1 segment (2.00 GiB) drain until their mappers unmap them",
        "  x, y, z",
        "(until the daemon restarts: the configuration file is not changed)",
    ]
    limits.dry_run = True
    assert acting.render_limits(limits).startswith("pool vista would be: ")
    assert "restarts" not in acting.render_limits(limits)


def test_ping_report():
    result = {"target": "unix:///s", "service": acting.SERVICE, "status": "SERVING", "connect_seconds": 0.0021,
              "rtt_seconds": {"min": 0.0004, "avg": 0.0005, "max": 0.0007, "count": 3}, "version": "0.1.0",
              "instance_id": "ab", "uptime_seconds": 65.0, "sessions": 1}  # fmt: skip
    assert acting.render_ping(result).splitlines() == [
        "kvbroker at unix:///s: SERVING",
        "  version 0.1.0, instance ab, up 1m 05s, 1 session",
        "  round trip 0.40 / 0.50 / 0.70 ms (min / avg / max of 3 health checks); connecting and the first "
        "check: 2.10 ms",
    ]


def stats(*, allocations: int, evictions: int, waits: int, calls: int, waiting: int = 0) -> pb.StatsResponse:
    usage = pb.Usage(total_capacity_bytes=GiB, total_allocated_bytes=GiB // 2, pinned_bytes=GiB // 4,
                     utilization_ratio=0.5, allocation_count=allocations, eviction_count=evictions, active_caches=3)  # fmt: skip
    return pb.StatsResponse(
        version="0.1.0", instance_id="ab", uptime_seconds=100, sessions=2, total_capacity_bytes=GiB,
        total_allocated_bytes=GiB // 2, pinned_bytes=GiB // 4,
        devices=[pb.DeviceStats(device="host", usage=usage)],
        pools=[pb.PoolStats(pool="vista", usage=usage, waiting_allocations=waiting, allocation_waits=waits)],
        methods=[pb.MethodStats(method="Allocate", calls=calls, calls_total=calls, p50_seconds=0.0006,
                                p99_seconds=0.0015)],
    )  # fmt: skip


def test_top_rates_come_from_two_snapshots():
    first = top.Sample(10.0, stats(allocations=10, evictions=1, waits=0, calls=100))
    second = top.Sample(12.0, stats(allocations=30, evictions=5, waits=4, calls=160, waiting=1))
    assert top.rates(None, first)["evictions"]["pool vista"] is None
    r = top.rates(first, second)
    assert r["allocations"]["device host"] == 10 and r["evictions"]["pool vista"] == 2
    assert r["waits"]["pool vista"] == 2 and r["methods"]["Allocate"] == 30
    screen = top.render_top(second, first, target="unix:///s", interval=2).splitlines()
    assert screen[0].startswith("kvbroker 0.1.0  instance ab  up 1m 40s  2 sessions  unix:///s  every 2s")
    (pool,) = [line for line in screen if line.startswith("pool vista")]
    assert "[=====#####..........]" in pool and pool.split()[-4:] == ["10.0/s", "2.00/s", "1", "2.00/s"]
    (allocate,) = [line for line in screen if line.startswith("Allocate")]
    assert allocate.split()[:2] == ["Allocate", "30.0/s"] and "0.60 ms" in allocate
    narrow = top.render_top(second, first, target="t", interval=2, width=30)
    assert max(len(line) for line in narrow.splitlines()) <= 30
    first_screen = top.render_top(first, None, target="t", interval=2)
    assert "(rates from the next refresh)" in first_screen
    line = json.loads(top.snapshot_json(second, first))
    assert line["rates_per_second"]["methods"]["Allocate"] == 30 and line["waiting_allocations"] == {"vista": 1}
    empty = top.Sample(1.0, pb.StatsResponse(methods=[pb.MethodStats(method="Stats", p50_seconds=math.nan)]))
    assert json.loads(top.snapshot_json(empty, None))["methods"]["Stats"]["p50_seconds"] is None


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--timeout", "-1", "stats"], "must be a positive number of seconds, got -1"),
        (["stats", "--timeout", "0"], "must be a positive number of seconds, got 0"),
        (["stats", "--timeout", "nan"], "must be a positive number of seconds"),
        (["stats", "--timeout", "soon"], "expected a number of seconds"),
        (["ls", "--limit", "0"], "must be at least 1"),
        (["ls", "--sort", "colour"], "invalid choice"),
        (["top", "--interval", "-2"], "must be a positive number of seconds"),
        (["pool", "set", "vista"], "give at least one of --max, --min, --priority"),
        (["pool", "set", "vista", "--max", "lots"], "expected a size"),
        (["pool", "set", "vista", "--max", "99999999999TiB"], "is more than 9223372036854775807 bytes"),
        (["pool", "set", "vista", "--priority", "4294967296"], "must be a 32-bit integer"),
        (["pool"], "required"),
        (["evict"], "--pool"),
        (["release"], "CACHE"),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(argv, says, capsys):
    assert cli.main(argv) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "serve"])
def test_every_command_has_a_help_page_with_a_description(command, capsys):
    argv = ["pool", "set", "--help"] if command == "pool" else [command, "--help"]
    assert cli.main(argv) == 0
    page = capsys.readouterr().out
    usage, _, rest = page.partition("\n\n")
    description = rest.split("\n\n", 1)[0]
    assert usage.startswith("usage: kvbroker ") and len(description.split()) >= 8, page
    assert "--json" in page
    assert ("--timeout" in page) == (command != "calc"), "calc asks no broker; every other command does"


def test_pool_set_parses_sizes(monkeypatch):
    seen = {}
    monkeypatch.setattr(acting, "cmd_pool_set", lambda client, args: seen.update(vars(args)) or "ok")
    parser = _parser()
    args = parser.parse_args(["pool", "set", "vista", "--max", "4GiB", "--min", "512MiB", "--priority", "-3"])
    assert (args.max, args.min, args.priority) == (4 * GiB, 512 * MiB, -3)
    assert parser.parse_args(["pool", "set", "v", "--max", "1073741824"]).max == GiB


def test_defrag_shows_what_compaction_fixes_apart_from_what_it_cannot_and_the_moves():
    from kvbroker.cli.views import render_defrag
    from kvbroker.v1 import broker_pb2 as pb

    result = pb.DefragmentResponse(
        caches_moved=2, bytes_moved=2 << 20, dry_run=True, fragmentation_before=0.5, fragmentation_after=0.5,
        fragmentation_within_segments_before=0.333, fragmentation_within_segments_after=0.0,
        fragmentation_across_segments_before=0.167, fragmentation_across_segments_after=0.5,
        free_bytes_in_segments=6 << 20, largest_free_extent_before_bytes=3 << 20, largest_free_extent_after_bytes=3 << 20,
        moves=[pb.PlannedMove(cache_id="c1", pool="p", device="host", nbytes=1 << 20, from_segment_id=1,
                              from_offset=1 << 20, to_segment_id=1, to_offset=0)],
        moves_total=2,
    )  # fmt: skip
    text = render_defrag(result)
    assert text.startswith("dry run: would move 2 caches")
    assert "within segments    33.3% -> 0.0%   compaction fixes this" in text
    assert "across segments    16.7% -> 50.0%   only segments going back" in text
    assert "c1" in text and "1:1.00 MiB" in text and "(first 1 of 2 moves)" in text


def test_stats_split_fragmentation_into_what_compaction_fixes_and_what_it_cannot():
    from kvbroker.cli.views import render_stats

    usage = pb.Usage(fragmentation_ratio=0.5, fragmentation_within_segments_ratio=0.2,
                     fragmentation_across_segments_ratio=0.3)
    stats = pb.StatsResponse(devices=[pb.DeviceStats(device="host", usage=usage)],
                             pools=[pb.PoolStats(pool="p", usage=pb.Usage(fragmentation_ratio=0.25,
                                                                           fragmentation_within_segments_ratio=0.25))])
    text = render_stats(stats)
    (header,) = [line for line in text.splitlines() if line.startswith("FRAGMENTATION")]
    assert "WITHIN SEGMENTS (compaction fixes)" in header and "ACROSS SEGMENTS (segments going back fix)" in header
    rows = {line.split()[1]: line.split()[2:] for line in text.splitlines()[text.splitlines().index(header) + 1:]
            if line.startswith(("device", "pool"))}
    assert rows == {"host": ["50.0%", "20.0%", "30.0%"], "p": ["25.0%", "25.0%", "0.0%"]}


def test_defrag_of_a_paged_pool_lists_block_copies():
    from kvbroker.cli.views import render_defrag

    result = pb.DefragmentResponse(
        caches_moved=1, bytes_moved=4096, fragmentation_before=0.5, fragmentation_after=0.0, paged=True,
        moves_total=3, block_moves=[pb.PagedBlockMove(sequence_id="s", from_block=5, to_block=1)],
    )  # fmt: skip
    text = render_defrag(result)
    assert text.startswith("moved 1 sequence into one run each: 3 block copies (4.00 KiB)")
    assert "block fragmentation  50.0% -> 0.0%" in text and "(first 1 of 3 block copies)" in text
    assert ["s", "5", "1"] in [line.split() for line in text.splitlines()]
