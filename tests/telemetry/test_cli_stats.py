"""``kvbroker stats`` shows per-method latency percentiles and recent errors."""

from __future__ import annotations

import math

from kvbroker import cli
from kvbroker.v1 import broker_pb2 as pb

from .conftest import Telemetered


def test_render_methods_busiest_first_with_error_codes() -> None:
    methods = [
        pb.MethodStats(method="Stats", calls=3, p50_seconds=0.0004, p95_seconds=0.0009, p99_seconds=0.0012),
        pb.MethodStats(method="Allocate", calls=120, errors=3, p50_seconds=0.00062, p95_seconds=0.0125,
                       p99_seconds=1.5, errors_by_code={"RESOURCE_EXHAUSTED": 2, "NOT_FOUND": 1}),
    ]  # fmt: skip
    assert cli.render_methods(methods).splitlines() == [
        "METHOD    CALLS  ERRORS      P50      P95      P99  ERROR CODES",
        "Allocate    120       3  0.62 ms  12.5 ms   1.50 s  RESOURCE_EXHAUSTED 2, NOT_FOUND 1",
        "Stats         3       0  0.40 ms  0.90 ms  1.20 ms  -",
    ]
    assert cli.format_latency(math.nan) == "-"
    assert cli.format_latency(0.25) == "250 ms"


def test_stats_without_telemetry_shows_no_rpc_table() -> None:
    assert "RPCs in the last" not in cli.render_stats(pb.StatsResponse())


def test_kvbroker_stats_against_a_daemon(telemetered: Telemetered, capsys) -> None:
    assert cli.main(["stats", "--target", telemetered.daemon.target]) == 0
    out = capsys.readouterr().out
    assert "RPCs in the last" in out
    (allocate,) = [line for line in out.splitlines() if line.startswith("Allocate ")]
    cells = allocate.split()
    assert cells[1:3] == ["11", "3"]  # 11 Allocate calls, 3 refused
    assert "NOT_FOUND 1" in allocate and "RESOURCE_EXHAUSTED 1" in allocate and "DEADLINE_EXCEEDED 1" in allocate
    assert cli.main(["stats", "--json", "--target", telemetered.daemon.target]) == 0
    assert '"p99_seconds"' in capsys.readouterr().out
