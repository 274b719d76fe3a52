"""Every operator command against a real daemon (tests/support/daemon.py), as an operator
types it: ``python -m kvbroker ...`` in a child process, text and ``--json``; and the
rights each acting command needs on a broker with principals."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys

import pytest

from kvbroker_client import BrokerClient, CacheEvicted
from tests.support.daemon import ROOT, child_env, daemon_fixture, running_daemon
from tests.support.wait import wait_until

MiB = 1 << 20

CONFIG = """
[devices]
host_capacity = "64MiB"

[[pools]]
name = "vista"
segment_bytes = "8MiB"
block_bytes = "1MiB"
gc_threshold = 1.0

[[pools]]
name = "ocr"
segment_bytes = "4MiB"
block_bytes = "1MiB"
max_bytes = "16MiB"
gc_threshold = 1.0
"""

daemon = daemon_fixture(config=CONFIG, scope="module", metrics=True)  # metrics: RPC figures for top


def kvbroker(target: str, *argv: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "kvbroker", "--target", target, *argv],
        cwd=ROOT, env=child_env(env), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_ls_shows_holders_sorts_limits_and_sums_per_model(daemon):
    with BrokerClient(daemon.target) as worker, BrokerClient(daemon.target) as other:
        big = worker.allocate("vista", size_bytes=6 * MiB, model_name="vista-7b", pinned=True)
        small = worker.allocate("ocr", size_bytes=MiB, model_name="ocr", retain=True)
        other.attach(small.cache_id)
        worker.allocate("ocr", size_bytes=2 * MiB, model_name="ocr")
        try:
            text = kvbroker(daemon.target, "ls", "--sort", "size").stdout.splitlines()
            assert text[0].split()[-4:] == ["AGE", "IDLE", "HELD", "BY"]
            first = text[1].split()
            assert first[0] == big.cache_id and first[-1] == worker.session_id and first[7] == "1"
            (row,) = [line for line in text if line.startswith(small.cache_id)]
            assert row.split()[-1] == ",".join(sorted([worker.session_id, other.session_id]))
            limited = kvbroker(daemon.target, "ls", "--sort", "size", "--limit", "1").stdout
            assert limited.rstrip().endswith("1 cache, 6.00 MiB (1 resident); 2 more not shown (--limit)")
            data = json.loads(kvbroker(daemon.target, "ls", "--json", "--sort", "last-used").stdout)
            created = data["caches"][0]["created_at"]
            assert created.endswith("Z") and "e+09" not in json.dumps(data), "RFC 3339, never 1.79e+09"
            age = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(created)
            assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)
            (listed,) = [c for c in data["caches"] if c["cache_id"] == small.cache_id]
            assert sorted(listed["holders"]) == sorted([worker.session_id, other.session_id])
            groups = kvbroker(daemon.target, "ls", "--group-by", "model").stdout.splitlines()
            assert groups[1].split()[:4] == ["vista-7b", "1", "6.00", "MiB"]
            assert groups[2].split()[:6] == ["ocr", "2", "3.00", "MiB", "0", "0"]
            summary = json.loads(kvbroker(daemon.target, "ls", "--group-by", "pool", "--json").stdout)
            assert summary["groups"][0] == {"pool": "vista", "caches": 1, "bytes": 6 * MiB, "pinned_caches": 1,
                                            "pinned_bytes": 6 * MiB, "idle_retained_caches": 0,
                                            "evicted_caches": 0, "holders": 1}  # fmt: skip
        finally:
            small.release(force=True)


def test_release_and_release_force(daemon):
    with BrokerClient(daemon.target) as worker:
        kept = worker.allocate("ocr", size_bytes=MiB, retain=True)
        done = kvbroker(daemon.target, "release", kept.cache_id)
        assert "not freed: other holders hold it or it is retained" in done.stdout
        assert json.loads(kvbroker(daemon.target, "release", kept.cache_id, "--force", "--json").stdout) == {
            "freed": True
        }
        with pytest.raises(CacheEvicted):
            kept.tensor()
        pinned = worker.allocate("ocr", size_bytes=MiB, pinned=True)
        refused = kvbroker(daemon.target, "release", pinned.cache_id, "--force", ok=False)
        assert refused.returncode == 1 and "pinned by 1 other holder" in refused.stderr
        missing = kvbroker(daemon.target, "release", "no-such-cache", ok=False)
        assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_evict_a_pool_and_only_its_idle_caches(daemon):
    with BrokerClient(daemon.target) as worker:
        held = worker.allocate("ocr", size_bytes=MiB, model_name="evict-test")
        idle = worker.allocate("ocr", size_bytes=MiB, model_name="evict-test", retain=True)
        pinned = worker.allocate("ocr", size_bytes=MiB, model_name="evict-test", pinned=True)
        idle_id = idle.cache_id
        idle.release()
        done = kvbroker(daemon.target, "evict", "--pool", "ocr", "--idle")
        assert done.stdout.startswith("evicted 1 idle retained cache (1.00 MiB) from pool ocr")
        assert idle_id in done.stdout
        reply = json.loads(kvbroker(daemon.target, "evict", "--pool", "ocr", "--json").stdout)
        assert held.cache_id in reply["cache_ids"] and pinned.cache_id not in reply["cache_ids"]
        wait_until(lambda: held.cache_id in worker.core._held and worker.core._held[held.cache_id].evicted, 10,
                   "the holder's Watch stream told it EVICTED")  # fmt: skip
        with pytest.raises(CacheEvicted):
            held.tensor()
        unknown = kvbroker(daemon.target, "evict", "--pool", "nosuch", ok=False)
        assert unknown.returncode == 1 and "nosuch" in unknown.stderr


def test_ping(daemon):
    done = kvbroker(daemon.target, "ping", "--count", "2")
    lines = done.stdout.splitlines()
    assert lines[0] == f"kvbroker at {daemon.target}: SERVING"
    assert lines[1].startswith("  version ") and "of 2 health checks" in lines[2]
    data = json.loads(kvbroker(daemon.target, "ping", "--json").stdout)
    assert data["status"] == "SERVING" and data["rtt_seconds"]["count"] == 3
    assert 0 < data["rtt_seconds"]["min"] <= data["rtt_seconds"]["max"] < 5


def test_ping_an_unreachable_broker_exits_1(tmp_path):
    done = kvbroker(f"unix://{tmp_path}/nobody.sock", "ping", "--timeout", "2", ok=False)
    assert done.returncode == 1 and done.stderr.startswith("kvbroker: ")


def test_pool_set_raises_lowers_refuses_and_reports(daemon):
    done = kvbroker(daemon.target, "pool", "set", "ocr", "--max", "24MiB", "--priority", "4")
    assert done.stdout.splitlines()[0] == "pool ocr is now: max 16.0 MiB -> 24.0 MiB, min 0 B, priority 0 -> 4"
    stats = json.loads(kvbroker(daemon.target, "stats", "--json").stdout)
    ocr = next(p for p in stats["pools"] if p["pool"] == "ocr")
    assert (ocr["max_bytes"], ocr["priority"]) == (str(24 * MiB), 4)
    assert "pool ocr limits set by anonymous: max_bytes 16777216 -> 25165824" in daemon.log()
    with BrokerClient(daemon.target, session_id="") as tool:  # sessionless: nothing maps the segments
        caches = [tool.allocate("ocr", size_bytes=4 * MiB, model_name="limits") for _ in range(3)]
        plan = json.loads(kvbroker(daemon.target, "pool", "set", "ocr", "--max", "8MiB", "--dry-run", "--json").stdout)
        assert plan["dry_run"] and plan["after"]["max_bytes"] == str(8 * MiB)
        lowered = kvbroker(daemon.target, "pool", "set", "ocr", "--max", "8MiB").stdout
        assert lowered.splitlines()[1] == "evicted 1 cache (4.00 MiB); 1 segment (4.00 MiB) went back to the device"
        assert "(until the daemon restarts" in lowered
        left = [c for c in caches if c.cache_id not in lowered]
        assert len(left) == 2
        for c in left:
            c.pin()
        refused = kvbroker(daemon.target, "pool", "set", "ocr", "--max", "1MiB", ok=False)
        assert refused.returncode == 1 and "the lowest max_bytes possible now is" in refused.stderr
        invalid = kvbroker(daemon.target, "pool", "set", "ocr", "--min", "32MiB", ok=False)
        assert invalid.returncode == 1 and invalid.stderr.startswith("kvbroker: min_bytes: ")
        for c in caches:
            c.release(force=True)
    kvbroker(daemon.target, "pool", "set", "ocr", "--max", "16MiB", "--priority", "0")


def test_top_without_a_terminal_prints_one_snapshot_per_interval(daemon):
    with BrokerClient(daemon.target) as worker:
        worker.allocate("vista", size_bytes=MiB)
        done = kvbroker(daemon.target, "top", "--interval", "0.2", "--iterations", "3")
    snapshots = done.stdout.split("\n--- ")
    assert len(snapshots) == 3 and snapshots[0].startswith("--- ")
    first, last = snapshots[0], snapshots[-1]
    assert "(rates from the next refresh)" in first and "rates from" not in last
    (vista,) = [line for line in last.splitlines() if line.startswith("pool vista")]
    assert "[" in vista and "]" in vista
    (total,) = [line for line in last.splitlines() if line.startswith("total ")]
    assert total.split()[-2:] == ["0", "0"], "allocations and evictions per second of the whole broker"
    assert any(line.startswith("Stats ") and "/s" in line for line in last.splitlines()), last
    lines = kvbroker(daemon.target, "top", "--json", "--interval", "0.1", "--iterations", "2").stdout.splitlines()
    first_json, second_json = (json.loads(line) for line in lines)
    assert first_json["rates_per_second"] is None and second_json["rates_per_second"]["methods"]["Stats"] > 0
    assert "pool vista" in second_json["scopes"]


CONFIG_AUTH = """
[devices]
host_capacity = "32MiB"

[[pools]]
name = "default"
segment_bytes = "8MiB"
block_bytes = "1MiB"

[[auth.principals]]
name = "worker"
token_env = "T_WORKER"
pools = { default = ["allocate", "attach", "release"] }

[[auth.principals]]
name = "ops"
token_env = "T_OPS"
operator = true
"""


def test_acting_needs_operator_rights_and_holders_need_the_list_right(tmp_path):
    tokens = {"T_WORKER": "tw", "T_OPS": "to"}
    with running_daemon(tmp_path, config=CONFIG_AUTH, env=tokens) as d:
        with BrokerClient(d.target, token="tw") as worker:
            cache = worker.allocate("default", size_bytes=MiB)
            as_worker = {"KVBROKER_TOKEN": "tw"}
            for argv in (["evict", "--pool", "default"], ["pool", "set", "default", "--max", "16MiB"]):
                denied = kvbroker(d.target, *argv, env=as_worker, ok=False)
                assert denied.returncode == 1 and "may not" in denied.stderr, denied.stderr
            listed = json.loads(kvbroker(d.target, "ls", "--json", env=as_worker).stdout)
            assert [c["holders"] for c in listed["caches"]] == [[]], "no other session's id without the list right"
            as_ops = {"KVBROKER_TOKEN": "to"}
            listed = json.loads(kvbroker(d.target, "ls", "--json", env=as_ops).stdout)
            assert listed["caches"][0]["holders"] == [worker.session_id]
            assert "pool default is now: max 32.0 MiB -> 16.0 MiB" in kvbroker(
                d.target, "pool", "set", "default", "--max", "16MiB", env=as_ops).stdout
            assert "evicted 1 cache" in kvbroker(d.target, "evict", "--pool", "default", env=as_ops).stdout
            assert "pool default limits set by ops" in d.log() and "pool default: ops evicted 1 caches" in d.log()
            assert cache.cache_id
