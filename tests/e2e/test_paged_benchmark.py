"""``benchmarks/paged.py`` runs end to end at a small size and reports the issue's keys
(the figures at full size are in the README)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.daemon import ROOT


def test_paged_benchmark_runs_and_reports_its_keys() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/paged.py", "--json", "--blocks", "256", "--sequences", "2", "--tokens", "100",
         "--warm-mib", "4", "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    memory = result["memory"]
    assert memory["paged"]["tokens_held"] > memory["contiguous"]["tokens_held"] > 0
    assert result["tokens_vs_contiguous_ratio"] == memory["paged"]["tokens_held"] / memory["contiguous"]["tokens_held"]
    assert 0 <= result["waste_fraction"] < 1 and result["rpcs_per_1000_tokens"] > 0
    assert isinstance(result["append_overhead_us"], float)
    assert set(result["warmup"]) >= {"cold", "prefaulted", "populated"}
    assert "paged KV pools (benchmarks/paged.py)" in done.stderr
