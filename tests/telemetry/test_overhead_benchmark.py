"""The overhead benchmark runs end to end (a few rounds; the figures are in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_runs_and_reports_ratios() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/telemetry_overhead.py", "--iterations", "60", "--warmup", "10", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["exit_codes"] == {"off": 0, "prometheus": 0, "otel": 0}
    assert result["otlp_spans"] > 0
    for key in ("off_p50_ms", "prometheus_p50_ratio", "prometheus_p99_ratio", "otel_p50_ratio"):
        assert result[key] > 0
    assert "target: prometheus P50 ratio" in done.stderr
