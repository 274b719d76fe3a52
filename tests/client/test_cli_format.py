"""The CLI's rendering (sizes, ratios, tables, JSON) from messages built here, and its
exit codes and output over the wire against the scripted fake broker."""

from __future__ import annotations

import json
import socket

import pytest
from google.protobuf import json_format

from kvbroker import cli
from kvbroker.cli import (
    format_bytes,
    format_duration,
    format_ratio,
    render_caches,
    render_defrag,
    render_stats,
    render_table,
    to_json,
)
from kvbroker.v1 import broker_pb2 as pb

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (64 * KiB, "64.0 KiB"),
        (10 * MiB, "10.0 MiB"),
        (12 * MiB + 512 * KiB, "12.5 MiB"),
        (512 * MiB, "512 MiB"),
        (GiB - 1, "1.00 GiB"),  # never "1024 MiB"
        (8 * GiB, "8.00 GiB"),
        (80 * GiB, "80.0 GiB"),
        (3 << 40, "3.00 TiB"),
        (-2 * MiB, "-2.00 MiB"),
    ],
)
def test_format_bytes(nbytes: int, text: str) -> None:
    assert format_bytes(nbytes) == text


def test_format_ratio_and_duration() -> None:
    assert format_ratio(0.0) == "0.0%"
    assert format_ratio(0.3125) == "31.2%"
    assert format_ratio(1.0) == "100.0%"
    assert format_ratio(float("nan")) == "-"
    assert format_duration(4.9) == "4s"
    assert format_duration(725) == "12m 05s"
    assert format_duration(2 * 3600 + 13 * 60 + 59) == "2h 13m"
    assert format_duration(3 * 86400 + 4 * 3600) == "3d 04h"
    assert format_duration(-5) == "0s"


def test_render_table_aligns_columns_and_strips_trailing_blanks() -> None:
    text = render_table(("NAME", "SIZE", "NOTE"), [("a", "1 B", ""), ("long-name", "8.00 GiB", "x")], "lrl")
    assert text.splitlines() == [
        "NAME           SIZE  NOTE",
        "a               1 B",
        "long-name  8.00 GiB  x",
    ]


def usage(capacity: int, allocated: int, *, caches: int, frag: float = 0.0, pinned: int = 0) -> pb.Usage:
    return pb.Usage(
        total_capacity_bytes=capacity, total_allocated_bytes=allocated, reserved_bytes=capacity,
        free_bytes=capacity - allocated, largest_free_extent_bytes=capacity - allocated,
        utilization_ratio=allocated / capacity, fragmentation_ratio=frag, active_caches=caches,
        segments=1, allocation_count=caches * 2, eviction_count=1, pinned_caches=pinned,
    )  # fmt: skip


def make_stats() -> pb.StatsResponse:
    gpu = "GPU-5f3c1a2b-0000-1111-2222-333344445555"
    return pb.StatsResponse(
        total_capacity_bytes=48 * GiB, total_allocated_bytes=12 * GiB, utilization_ratio=0.25,
        fragmentation_ratio=0.125, active_caches=7, allocation_count=14, eviction_count=2,
        pinned_bytes=512 * MiB, free_bytes=36 * GiB, largest_free_extent_bytes=20 * GiB,
        devices=[
            pb.DeviceStats(device="host", usage=usage(8 * GiB, 2 * GiB, caches=3)),
            pb.DeviceStats(device=gpu, usage=usage(40 * GiB, 10 * GiB, caches=4, frag=0.15)),
        ],
        pools=[
            pb.PoolStats(pool="default", usage=usage(16 * GiB, 4 * GiB, caches=5), max_bytes=16 * GiB,
                         priority=0, eviction_policy="lru"),
            pb.PoolStats(pool="vista", usage=usage(32 * GiB, 8 * GiB, caches=2, pinned=1), min_bytes=4 * GiB,
                         priority=10, eviction_policy="size_aware_lru", waiting_allocations=2, allocation_waits=7),
        ],
        version="0.1.0", instance_id="47b15057", uptime_seconds=7980, sessions=3,
    )  # fmt: skip


def test_render_stats_shows_total_devices_and_pools_in_one_aligned_table() -> None:
    lines = render_stats(make_stats()).splitlines()
    assert lines[0] == "kvbroker 0.1.0  instance 47b15057  up 2h 13m  3 sessions"
    header = lines[2]
    assert header.split()[:3] == ["SCOPE", "CAPACITY", "ALLOCATED"]
    total, host, gpu, default, vista = lines[3:8]
    assert total.split() == ["total", "48.0", "GiB", "12.0", "GiB", "36.0", "GiB", "20.0", "GiB", "512", "MiB",
                             "25.0%", "12.5%", "7", "14", "2"]  # fmt: skip
    assert host.startswith("device host ")
    assert gpu.startswith("device GPU-5f3c1a2b-0000-1111-2222-333344445555 ")
    assert "15.0%" in gpu.split()
    assert default.startswith("pool default ") and vista.startswith("pool vista ")
    # right-aligned numbers: every row of the usage table ends at the same column
    assert len({len(line) for line in lines[2:8]}) == 1
    assert lines[8] == ""
    pools = lines[9:]
    assert pools[0].split() == ["POOL", "MIN", "MAX", "PRIORITY", "POLICY", "PINNED", "IDLE", "RETAINED",
                                "WAITING", "WAITED"]  # fmt: skip
    assert pools[1].split() == ["default", "0", "B", "16.0", "GiB", "0", "lru", "0", "0", "0", "0"]
    assert pools[2].split() == ["vista", "4.00", "GiB", "unlimited", "10", "size_aware_lru", "1", "0", "2", "7"]


def test_render_stats_of_an_empty_broker() -> None:
    text = render_stats(pb.StatsResponse())
    assert "total" in text and "POOL" not in text


def make_caches() -> list[pb.Cache]:
    return [
        pb.Cache(cache_id="kv-a", pool="default", model_name="llama", nbytes=3 * MiB, device="host",
                 state=pb.CACHE_STATE_RESIDENT, pin_count=1, pinned=True, holder_count=2, retain=True,
                 dtype=pb.DTYPE_FLOAT16, shape=[2, 1024, 768], epoch=3, last_access_at={"seconds": 1000}),
        pb.Cache(cache_id="kv-b", pool="vista", nbytes=1 * GiB, device="host", state=pb.CACHE_STATE_EVICTED,
                 priority=-5),
    ]  # fmt: skip


def test_render_caches_rows_and_total_line() -> None:
    lines = render_caches(make_caches(), now=1065.0).splitlines()
    assert lines[0].split()[:3] == ["CACHE", "ID", "POOL"]
    assert lines[1].split() == ["kv-a", "default", "llama", "host", "3.00", "MiB", "resident", "1", "2", "yes",
                                "0", "float16[2,1024,768]", "3", "-", "1m", "05s"]  # fmt: skip
    assert lines[2].split() == ["kv-b", "vista", "-", "host", "1.00", "GiB", "evicted", "0", "0", "no", "-5",
                                "-", "0", "-", "-"]  # fmt: skip
    assert lines[3] == ""
    assert lines[4] == "2 caches, 1.00 GiB (1 evicted, 1 resident)"
    assert render_caches([]) == "no caches"


def test_render_defrag_says_what_moved_or_would() -> None:
    done = pb.DefragmentResponse(caches_moved=3, bytes_moved=24 * MiB, fragmentation_before=0.079,
                                 segments_freed=1, duration_seconds=0.0044)  # fmt: skip
    text = render_defrag(done)
    assert text.splitlines()[0] == "moved 3 caches (24.0 MiB); 1 segment freed (0 B back to the device); took 4.4 ms"
    assert "fragmentation        7.9% -> 0.0%" in text
    plan = pb.DefragmentResponse(caches_moved=1, bytes_moved=KiB, dry_run=True)
    assert render_defrag(plan).startswith("dry run: would move 1 cache (1.00 KiB); ")
    assert "0 segments would be freed" in render_defrag(plan)


def test_json_keeps_proto_field_names_every_field_and_field_order() -> None:
    stats = make_stats()
    data = json.loads(to_json(stats))
    assert list(data) == [f.name for f in pb.StatsResponse.DESCRIPTOR.fields]
    assert data["total_capacity_bytes"] == str(48 * GiB)  # proto3 JSON: 64-bit integers are strings
    assert data["active_caches"] == 7
    assert data["utilization_ratio"] == 0.25
    assert [d["device"] for d in data["devices"]] == ["host", "GPU-5f3c1a2b-0000-1111-2222-333344445555"]
    assert list(data["devices"][0]["usage"]) == [f.name for f in pb.Usage.DESCRIPTOR.fields]
    assert data["pools"][0]["min_bytes"] == "0"  # zero values are printed, never dropped
    assert data["pools"][1]["eviction_policy"] == "size_aware_lru"
    assert json_format.ParseDict(data, pb.StatsResponse()) == stats


def test_json_of_a_cache_listing() -> None:
    data = json.loads(to_json(pb.ListCachesResponse(caches=make_caches())))
    assert list(data) == ["caches", "next_page_token"]
    first = data["caches"][0]
    assert first["cache_id"] == "kv-a" and first["state"] == "CACHE_STATE_RESIDENT"
    assert first["dtype"] == "DTYPE_FLOAT16" and first["shape"] == ["2", "1024", "768"]
    assert data["caches"][1]["pinned"] is False


# -- the command ----------------------------------------------------------------------------


def test_stats_json_over_the_wire(fake_broker, capsys) -> None:
    fake_broker.broker.stats_response = make_stats()
    assert cli.main(["stats", "--json", "--target", fake_broker.target]) == 0
    out = capsys.readouterr().out
    assert json_format.Parse(out, pb.StatsResponse()) == make_stats()
    # operators call as the anonymous holder: no session metadata
    assert "kvbroker-session-id" not in fake_broker.broker.calls[-1][2]


def test_common_flags_work_before_the_command_and_env_gives_the_target(fake_broker, capsys, monkeypatch) -> None:
    fake_broker.broker.stats_response = make_stats()
    monkeypatch.setenv(cli.ENV_TARGET, fake_broker.target)
    assert cli.main(["--json", "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["instance_id"] == "47b15057"
    assert cli.main(["stats"]) == 0
    assert capsys.readouterr().out.startswith("kvbroker 0.1.0  instance 47b15057")


def test_ls_follows_pages_and_passes_filters(fake_broker, capsys) -> None:
    fake_broker.broker.caches = [pb.Cache(cache_id=f"c{i:04d}", pool="default", nbytes=KiB, device="host",
                                          state=pb.CACHE_STATE_RESIDENT) for i in range(2500)]  # fmt: skip
    assert cli.main(["ls", "--target", fake_broker.target, "--pool", "default", "--state", "resident"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("2500 caches, 2.44 MiB (2500 resident)")
    requests = fake_broker.broker.requests("ListCaches")
    assert [r.page_token for r in requests] == ["", "c0999", "c1999"], "pages of the broker's maximum, 1000"
    assert requests[0].pool == "default" and requests[0].state == pb.CACHE_STATE_RESIDENT


def test_defrag_passes_its_flags(fake_broker, capsys) -> None:
    argv = ["defrag", "--target", fake_broker.target, "--device", "host", "--pool", "p", "--dry-run"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("dry run: would move 2 caches (3.00 MiB)")
    (request,) = fake_broker.broker.requests("Defragment")
    assert (request.device, request.pool, request.dry_run, request.target_bytes) == ("host", "p", True, 0)
    assert cli.main(["defrag", "--target", fake_broker.target, "--target-bytes", "512MiB"]) == 0
    assert fake_broker.broker.requests("Defragment")[-1].target_bytes == 512 * 1024 * 1024


def test_unreachable_target_exits_1_and_names_it(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    assert cli.main(["stats", "--target", target]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kvbroker: cannot reach kvbroker at {target}: ")


def test_broker_refusal_exits_1_with_its_message(fake_broker, capsys, monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        from kvbroker_client import InvalidRequest

        raise InvalidRequest("page_size: must be at most 1000")

    monkeypatch.setattr("kvbroker_client.BrokerClient.list_caches", refuse)
    assert cli.main(["ls", "--target", fake_broker.target]) == 1
    assert capsys.readouterr().err == "kvbroker: page_size: must be at most 1000\n"


@pytest.mark.parametrize("argv", [[], ["ls", "--state", "gone"], ["stats", "--bogus"], ["nope"]])
def test_usage_errors_exit_2(argv, capsys) -> None:
    assert cli.main(argv) == 2
    assert "kvbroker" in capsys.readouterr().err


def test_version_and_help_exit_0(capsys) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "kvbroker 0.1.0"
    assert cli.main(["--help"]) == 0
    assert "stats" in capsys.readouterr().out


def test_serve_hands_every_following_argument_to_the_daemon(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr("kvbroker.daemon.main", lambda argv: seen.append(argv) or 3)
    assert cli.main(["serve", "--listen", "127.0.0.1:0", "--help"]) == 3
    assert seen == [["--listen", "127.0.0.1:0", "--help"]]
