"""Operators' view: grpcurl lists the services by reflection and calls them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl is installed by the dev extra")


def grpcurl(daemon, *args: str) -> str:
    done = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def call(daemon, method: str, body: dict | None = None) -> dict:
    args = ["-d", json.dumps(body)] if body is not None else []
    return json.loads(grpcurl(daemon, *args, daemon.address, method))


def test_reflection_lists_the_services(daemon):
    services = grpcurl(daemon, daemon.address, "list").split()
    assert "kvbroker.v1.CacheBroker" in services
    assert "grpc.health.v1.Health" in services
    methods = grpcurl(daemon, daemon.address, "list", "kvbroker.v1.CacheBroker").split()
    for name in ("Allocate", "Release", "Attach", "Pin", "Unpin", "Stats", "ListCaches", "Defragment"):
        assert f"kvbroker.v1.CacheBroker.{name}" in methods


def test_health_and_stats(daemon):
    assert call(daemon, "grpc.health.v1.Health/Check")["status"] == "SERVING"
    stats = call(daemon, "kvbroker.v1.CacheBroker/Stats")
    assert int(stats["total_capacity_bytes"]) == 256 * 1024 * 1024
    assert {d["device"] for d in stats["devices"]} == {"host"}
    assert {p["pool"] for p in stats["pools"]} == {"default", "small"}


def test_allocate_and_release_by_grpcurl(daemon):
    reply = call(daemon, "kvbroker.v1.CacheBroker/Allocate",
                 {"pool": "default", "size_bytes": 2097152, "cache_id": "from-grpcurl", "model_name": "ops"})
    assert reply["cache"]["cache_id"] == "from-grpcurl"
    assert reply["cache"]["state"] == "CACHE_STATE_RESIDENT"
    assert reply["handle"]["host"]["shm_name"].startswith("kvb-")
    listed = call(daemon, "kvbroker.v1.CacheBroker/ListCaches", {"model_name": "ops"})
    assert [c["cache_id"] for c in listed["caches"]] == ["from-grpcurl"]
    assert call(daemon, "kvbroker.v1.CacheBroker/Release", {"cache_id": "from-grpcurl"}) == {"freed": True}
