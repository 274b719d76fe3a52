"""Crash soak (issue 9): client processes SIGKILLed in a loop, at every point of their
life, including while an Allocate that creates a large segment is in flight.

Guards against: a killed client's caches, pins or segment mappings outliving it, and a
segment the daemon was creating for a dead caller escaping the accounting. Afterwards
allocated bytes return to the baseline and the shm dir to its baseline object count.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .helpers import MiB, ROOT, Operator, accounting_problems, child_env, shm_problems, wait_until

#: Kills per run: CI-sized by default; raise it (KVB_SOAK_KILLS=500) for a real soak.
KILLS = int(os.environ.get("KVB_SOAK_KILLS", "30"))
PARALLEL = 3
SMALL = 256 * 1024
BIG = 128 * MiB

CONFIG = """
[devices]
host_capacity = "1GiB"

[[pools]]
name = "soak"
max_bytes = "1GiB"
segment_bytes = "4MiB"
block_bytes = "64KiB"
gc_threshold = 1.0
"""

#: When the client dies: as soon as its session is open, after its small caches, right
#: after it sent the large Allocate (while the daemon creates the segment), or once it
#: holds everything.
MOMENTS = ("ready", "big", "big", "done")


def kill_cycle(target: str, index: int, rng: random.Random) -> str:
    """One client process, SIGKILLed at ``MOMENTS[index % 4]``. Returns the moment."""
    moment = MOMENTS[index % len(MOMENTS)]
    jitter = rng.uniform(0, 0.03)  # spreads the "big" kills over the segment's creation
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.safety.workers", "crash", target, "soak", str(SMALL), str(BIG)],
        cwd=ROOT, env=child_env(), text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline().strip()
            if not line:
                raise AssertionError(f"client died before {moment!r}: {process.stderr.read()[-2000:]}")
            if line == moment:
                break
        else:
            raise AssertionError(f"client never reached {moment!r}")
        if moment == "big":
            time.sleep(jitter)  # deliberate: a kill at a random point of the Allocate
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL
        return moment
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _observe(fn):
    """Run a check and keep its failure as data (the tests assert on it)."""
    try:
        fn()
    except AssertionError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    """Run the kill loop once against a fresh daemon; yield what was seen afterwards."""
    from .conftest import _stop_clean, start_safety_daemon

    daemon = start_safety_daemon(tmp_path_factory.mktemp("soak"), CONFIG, "--segment-idle-seconds", "0.2")
    seen: dict = {"baseline_objects": len(daemon.shm_objects())}
    with Operator(daemon.target) as op:
        baseline_allocated = op.stats().total_allocated_bytes
        rng = random.Random(int(os.environ.get("KVB_SAFETY_SEED", "7")))
        jitters = [random.Random(rng.random()) for _ in range(KILLS)]
        with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            seen["moments"] = list(pool.map(lambda i: kill_cycle(daemon.target, i, jitters[i]), range(KILLS)))
        seen["alive"] = daemon.alive()
        seen["freed"] = _observe(lambda: wait_until(
            lambda: op.stats().total_allocated_bytes == baseline_allocated and not op.caches(), timeout=15,
            what="allocated bytes back to the baseline", detail=lambda: [c.cache_id for c in op.caches()][:10],
        ))
        seen["accounting"] = accounting_problems(op.stats(), op.caches())
        seen["shm_back"] = _observe(lambda: wait_until(
            lambda: len(daemon.shm_objects()) == seen["baseline_objects"] and not shm_problems(daemon, op.stats())
            and not any(p.usage.segments for p in op.stats().pools),
            timeout=8, what="the shm dir back to its baseline object count",
            detail=lambda: (daemon.shm_objects(), shm_problems(daemon, op.stats())),
        ))
    seen["log"] = daemon.log()
    yield seen
    _stop_clean(daemon)


def test_killed_clients_leave_no_cache_behind(soak):
    """KILLS client processes (3 at a time), each SIGKILLed at some point of its life,
    half of them while their 128 MiB Allocate (a new segment) is in flight. Then the
    daemon serves, allocated bytes are back to the baseline with no cache left, and
    Stats and ListCaches agree exactly."""
    assert soak["moments"].count("big") >= KILLS // 2, soak["moments"]
    assert soak["alive"], soak["log"][-4000:]
    assert soak["freed"] is None, soak["freed"]
    assert not soak["accounting"], soak["accounting"]
    assert "Traceback" not in soak["log"], soak["log"][-4000:]


def test_killed_clients_leave_no_segment_behind(soak):
    """After the same kills, once idle segments retire (0.2 s), the shm dir is back to
    its baseline object count and every shm object is one Stats counts."""
    assert soak["shm_back"] is None, soak["shm_back"]
