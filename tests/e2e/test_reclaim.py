"""Background reclamation against the example configuration (issue 10.3).

``deploy/kvbroker.example.toml``'s ``vista`` pool (1536 MiB, ``gc_threshold = 0.85``)
once evicted a 1400 MiB cache one second after a live worker allocated it, and said
nothing. Now the tick takes only idle retained caches, a held cache goes only when
another allocation needs its room (the pressure path), and every eviction is an INFO
line of the daemon's log with the pool, the cache, the bytes and the reason.
"""

from __future__ import annotations

import re

import pytest

from kvbroker_client import BrokerClient, CacheEvicted

from tests.support.daemon import ROOT, running_daemon
from tests.support.wait import wait_until

MiB = 1 << 20
EXAMPLE = (ROOT / "deploy" / "kvbroker.example.toml").read_text()


def evictions_logged(daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if "evicted cache" in line]


def test_the_tick_takes_idle_retained_caches_never_a_held_one_and_logs_each(tmp_path):
    with running_daemon(tmp_path, config=EXAMPLE) as daemon:
        with BrokerClient(daemon.target) as worker, BrokerClient(daemon.target) as other:
            held = worker.allocate("vista", size_bytes=1400 * MiB, model_name="VISTA")
            # Above the threshold now (1464 of 1536 MiB): an idle retained cache is what
            # the tick may take; its eviction proves the tick ran over the held one.
            idle = other.allocate("vista", size_bytes=64 * MiB, retain=True)
            idle_id = idle.cache_id
            idle.release()
            wait_until(
                lambda: idle_id not in {c.cache_id for c in other.list_caches(pool="vista")},
                10, "background reclamation took the idle retained cache",
            )
            line = wait_until(lambda: evictions_logged(daemon), 10, "the eviction is logged")
            assert len(line) == 1 and re.search(
                rf"INFO .*evicted cache {idle_id} \(pool vista, device host, 64\.00 MiB = {64 * MiB} bytes, "
                r"cause threshold, no holder\): idle retained cache reclaimed above gc_threshold", line[0]
            ), line
            # The held cache survived the tick that ran above the threshold.
            [info] = [c for c in worker.list_caches(pool="vista") if c.cache_id == held.cache_id]
            assert info.state == 1 and not held.evicted  # CACHE_STATE_RESIDENT
            held.tensor()[:8].fill_(7)

            # Room for another allocation is the pressure path's to make: the held cache
            # goes (same priority, the pool's policy), and that is logged too.
            second = other.allocate("vista", size_bytes=1400 * MiB)
            wait_until(lambda: len(evictions_logged(daemon)) == 2, 10, "the pressure eviction is logged")
            assert re.search(
                rf"evicted cache {held.cache_id} \(pool vista, device host, 1\.37 GiB = {1400 * MiB} bytes, "
                r"cause policy\): evicted by pool 'vista' policy", evictions_logged(daemon)[1]
            ), evictions_logged(daemon)
            wait_until(lambda: held.evicted, 10, "the worker's Watch stream tells it of the eviction")
            with pytest.raises(CacheEvicted):
                held.tensor()
            second.release()
