"""Concurrent tenants (issue 9): several client processes, several threads each, doing a
bounded mix of Allocate / Attach / Pin / write / verify / Unpin / Release against one real
daemon, each cache holding the byte pattern of its own id.

Guards against: two live caches sharing bytes (overlapping extents), a tenant reading or
clobbering another's bytes, accounting that drifts under concurrency, and segments or shm
objects that outlive the clients.

The workload runs once per module (``workload``); each test judges one aspect of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kvbroker_client import BrokerClient

from .helpers import ROOT, Operator, accounting_problems, child_env, extent_overlaps, wait_until
from .workers import pattern_of

PROCESSES = 3
THREADS = 3
OPS = 30

CONFIG = """
[devices]
host_capacity = "512MiB"

[[pools]]
name = "c"
max_bytes = "256MiB"
segment_bytes = "8MiB"
block_bytes = "4KiB"
gc_threshold = 1.0
"""


def _observe(fn):
    """Run a check and keep its failure as data (the tests assert on it)."""
    try:
        fn()
    except AssertionError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """Run the workers; while they hold their caches, look at everything (handles,
    bytes, Stats, ListCaches); let them exit; look again. Yields what was seen."""
    from .conftest import _stop_clean, start_safety_daemon

    daemon = start_safety_daemon(tmp_path_factory.mktemp("concurrency"), CONFIG, "--segment-idle-seconds", "0.3")
    seed = int(os.environ.get("KVB_SAFETY_SEED", "7"))
    seen: dict = {}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.safety.workers", "mixed", daemon.target, str(i), str(THREADS), str(OPS), str(seed)],
            cwd=ROOT, env=child_env(), text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for i in range(PROCESSES)
    ]
    try:
        reports = []
        for w in workers:
            line = w.stdout.readline()
            assert line, f"worker died: {w.stderr.read()[-4000:]}"
            reports.append(json.loads(line))
        seen["reports"] = reports
        held = {cache_id: nbytes for r in reports for cache_id, nbytes in r["live"].items()}
        seen["held"] = held
        with Operator(daemon.target) as op:
            seen["listed"] = sorted(c.cache_id for c in op.caches())
            stats, caches, again = op.stats(), op.caches(), op.stats()
            seen["accounting"] = accounting_problems(stats, caches)
            seen["quiet"] = stats.total_allocated_bytes == again.total_allocated_bytes
        handles, wrong = [], []
        with BrokerClient(daemon.target) as inspector:
            for cache_id in sorted(held):
                cache = inspector.attach(cache_id)
                handles.append((cache_id, cache.handle, cache.info.reserved_bytes))
                with cache.pinned() as t:
                    if t.numel() != held[cache_id] or not torch.equal(t, pattern_of(cache_id, t.numel())):
                        wrong.append(cache_id)
                cache.release()
        seen["overlaps"] = extent_overlaps(handles)
        seen["wrong_bytes"] = wrong
    finally:
        for w in workers:
            if w.poll() is None:
                try:
                    w.stdin.write("exit\n")
                    w.stdin.flush()
                except OSError:
                    pass
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    seen["exit_codes"] = [w.returncode for w in workers]
    seen["stderr"] = [w.stderr.read()[-2000:] for w in workers]
    with Operator(daemon.target) as op:
        seen["freed"] = _observe(lambda: wait_until(
            lambda: op.stats().total_allocated_bytes == 0 and not op.caches(), timeout=10,
            what="every cache freed once its clients exited", detail=lambda: [c.cache_id for c in op.caches()][:10],
        ))
        seen["retired"] = _observe(lambda: wait_until(
            lambda: daemon.shm_objects() == [] and not any(p.usage.segments or p.usage.reserved_bytes for p in op.stats().pools),
            timeout=15, what="every segment retired and unlinked", detail=daemon.shm_objects,
        ))
        seen["accounting_after"] = accounting_problems(op.stats(), op.caches())
    yield seen
    _stop_clean(daemon)


def test_concurrent_tenants_keep_their_bytes_and_leak_nothing(workload):
    """3 processes x 3 threads x 30 mixed operations. With every worker holding its
    caches: no worker saw a wrong byte of its own or an unexpected error; the live caches
    are exactly those the workers hold; no two live caches' byte ranges (from Attach
    handles: segment, generation, offset, reserved bytes) overlap; each holds its own
    pattern; Stats and ListCaches agree exactly. After the workers exit: every cache
    freed, every segment retired, no shm object left."""
    reports = workload["reports"]
    errors = [e for r in reports for e in r["errors"]]
    assert not errors, "\n".join(errors[:5])
    total = sum(sum(r["counts"].values()) for r in reports)
    assert total >= PROCESSES * THREADS * OPS * 0.9, [r["counts"] for r in reports]
    assert all(r["counts"].get("attach_other", 0) for r in reports), "no worker read another's cache"
    assert workload["held"], "test precondition: the workers hold caches at the end"
    assert workload["listed"] == sorted(workload["held"])
    assert not workload["overlaps"], "\n".join(workload["overlaps"])
    assert not workload["wrong_bytes"], f"caches not holding their own pattern: {workload['wrong_bytes']}"
    assert workload["quiet"] and not workload["accounting"], workload["accounting"]
    assert workload["exit_codes"] == [0] * PROCESSES, workload["stderr"]
    assert workload["freed"] is None, workload["freed"]
    assert workload["retired"] is None, workload["retired"]
    assert not workload["accounting_after"], workload["accounting_after"]


def test_concurrent_tenants_never_see_a_previous_tenants_bytes(workload):
    """In the same run: every new cache read all zeros before its owner wrote it, and
    every other process's cache a worker read held only its own pattern or zeros."""
    reports = workload["reports"]
    assert sum(r["counts"].get("allocate", 0) for r in reports) > 0
    dirty = [c for r in reports for c in r["dirty_fresh"]]
    foreign = [c for r in reports for c in r["foreign_bytes"]]
    assert not dirty, f"{len(dirty)} new caches held someone's old bytes, e.g. {dirty[:5]}"
    assert not foreign, f"{len(foreign)} caches held bytes of another tenant, e.g. {foreign[:5]}"
