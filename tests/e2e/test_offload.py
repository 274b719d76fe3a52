"""The offload tier end to end (issue 13): real daemons, real worker processes.

A worker holds a cache in a pool that offloads; a second worker fills the pool; the
first cache is offloaded, not evicted (OFFLOADED in ListCaches and ``kvbroker ls --state
offloaded``), the first worker learns it moved, and its next use restores it (the second
worker's cache going out in turn) byte for byte after re-mapping. When the tier itself
is full, the cache is evicted as before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import BrokerClient

from tests.e2e.test_sessions import Agent
from tests.support.daemon import ROOT, child_env, running_daemon
from tests.support.wait import wait_until

MiB = 1 << 20


def _config(host_max: str, tier: str = "host", directory: str = "") -> str:
    return f"""
[devices]
host_capacity = "16MiB"

[persistence]
host_max_bytes = "{host_max}"
disk_max_bytes = "64MiB"
dir = "{directory}"

[[pools]]
name = "w"
max_bytes = "8MiB"
segment_bytes = "8MiB"
block_bytes = "1MiB"
gc_threshold = 1.0
offload = "{tier}"
"""


def _metric(daemon, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(daemon.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def _states(client: BrokerClient) -> dict[str, int]:
    return {c.cache_id: c.state for c in client.list_caches(pool="w")}


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_cache_pushed_out_is_offloaded_and_its_holders_next_use_restores_it(tmp_path, tier):
    config = _config("64MiB", tier, str(tmp_path / "state"))
    with running_daemon(tmp_path, config=config, metrics=True) as daemon, BrokerClient(daemon.target) as observer:
        holder, filler = Agent(daemon.target), Agent(daemon.target)
        try:
            first = holder("allocate", pool="w", size_bytes=6 * MiB, model_name="m")
            assert holder("fill", cache_id=first, salt=5)
            second = filler("allocate", pool="w", size_bytes=6 * MiB)  # no room: the first goes out
            assert filler("fill", cache_id=second, salt=9)
            assert _states(observer) == {first: pb.CACHE_STATE_OFFLOADED, second: pb.CACHE_STATE_RESIDENT}
            (pool,) = observer.stats().pools
            assert (pool.offloaded_host_bytes, pool.offloaded_disk_bytes) == ((6 * MiB, 0) if tier == "host" else (0, 6 * MiB))
            wait_until(lambda: holder("state", cache_id=first)["stale"], 10, "the holder learns its cache moved")
            assert not holder("state", cache_id=first)["evicted"]
            listed = subprocess.run(
                [sys.executable, "-m", "kvbroker", "--target", daemon.target, "ls", "--state", "offloaded", "--json"],
                cwd=ROOT, env=child_env(None), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert listed.returncode == 0, listed.stderr
            assert [(c["cache_id"], c["state"]) for c in json.loads(listed.stdout)["caches"]] == [(first, "CACHE_STATE_OFFLOADED")]

            # The holder's next use re-attaches: the broker restores the cache (the
            # filler's goes out to make room) and the holder reads its own bytes.
            assert holder("check", cache_id=first, salt=5)
            assert _states(observer) == {first: pb.CACHE_STATE_RESIDENT, second: pb.CACHE_STATE_OFFLOADED}
            wait_until(lambda: filler("state", cache_id=second)["stale"], 10, "the filler learns its cache moved")
            assert filler("check", cache_id=second, salt=9)  # and back: byte for byte both ways
            assert holder("check", cache_id=first, salt=5)
            if tier == "disk":  # the filler's cache is on disk again, in one file bound to it
                assert len(list((tmp_path / "state" / "offload").iterdir())) == 1
            # Four copy-outs (first, second, first, second) and three restores, on /metrics.
            assert _metric(daemon, "kvbroker_offloads_total", pool="w", tier=tier, outcome="ok") == 4
            assert _metric(daemon, "kvbroker_restores_total", pool="w", tier=tier, outcome="ok") == 3
            assert _metric(daemon, "kvbroker_restore_duration_seconds_count", pool="w", tier=tier) == 3
            assert _metric(daemon, "kvbroker_offloaded_bytes", pool="w", tier=tier) == 6 * MiB
        finally:
            holder.close()
            filler.close()


def test_when_the_tier_is_full_the_cache_is_evicted(tmp_path):
    with running_daemon(tmp_path, config=_config("4MiB")) as daemon, BrokerClient(daemon.target) as observer:
        holder, filler = Agent(daemon.target), Agent(daemon.target)
        try:
            first = holder("allocate", pool="w", size_bytes=6 * MiB)
            filler("allocate", pool="w", size_bytes=6 * MiB)
            wait_until(lambda: holder("state", cache_id=first)["evicted"], 10, "the holder learns of the eviction")
            assert _states(observer)[first] == pb.CACHE_STATE_EVICTED
            assert "evicted cache " + first in daemon.log()
        finally:
            holder.close()
            filler.close()
