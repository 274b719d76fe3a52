"""The README's examples (``examples/``: the kvcached guide's VISTA and DeepSeek-OCR use
cases written for this client) run as written, each as a subprocess against a real
daemon serving ``deploy/kvbroker.example.toml`` on the host device, and leave nothing
behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvbroker_client import BrokerClient

from tests.support.daemon import ROOT, child_env, daemon_fixture

EXAMPLE_CONFIG = (ROOT / "deploy" / "kvbroker.example.toml").read_text()

daemon = daemon_fixture(config=EXAMPLE_CONFIG, scope="module")


def run_example(name: str, daemon) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=child_env({"KVBROKER_TARGET": daemon.target}),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vista.py", ["generation: cache ", "batch: 2.000, 3.000, 4.000", "Total capacity: 2.00 GB", "Utilization: ",
                      "Fragmentation: ", "vista: 0 caches, 4 allocations"]),
        ("deepseek_ocr.py", ["compressed: 36 rows, checksum ", "parallel: ", "deepseek-ocr: 9 allocations, 0 caches left"]),
    ],
)
def test_an_example_runs_against_the_example_config_and_cleans_up(daemon, name, expected):
    out = run_example(name, daemon)
    for text in expected:
        assert text in out, out
    with BrokerClient(daemon.target) as operator:
        assert operator.list_caches() == [], "every cache the example took is released"
