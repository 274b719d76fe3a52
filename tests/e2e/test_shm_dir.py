"""A daemon with its own ``--shm-dir`` (issue 10.1).

With the daemon's segments outside ``/dev/shm``, the README's worker once failed with
``StaleHandleError: /dev/shm/kvb-...-1-1 does not exist`` (the handle carried only the
object's name) and left its retained cache behind with no holder. The handle now says
where the object is, so the README's two processes work as written; and a client that
cannot reach the daemon's memory gets the error from ``allocate`` itself, which gives the
cache back first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kvbroker_client import BrokerClient, StaleHandleError
from kvbroker_client import handles

from tests.e2e.conftest import CONFIG
from tests.support.daemon import PRIVATE_SHM, ROOT, child_env, daemon_fixture

daemon = daemon_fixture(config=CONFIG, shm_dir=PRIVATE_SHM, scope="module")

# The README's worker ("Use it from a worker"), with the daemon's target.
WRITER = textwrap.dedent(
    """
    import sys, torch
    from kvbroker_client import BrokerClient

    with BrokerClient(sys.argv[1]) as broker:
        cache = broker.allocate("default", dtype=torch.float16, shape=(32, 2, 4096, 128), retain=True)
        kv = cache.tensor()            # a view of the broker's memory: no copy
        kv.normal_()
        print(cache.cache_id, float(kv.float().sum()), flush=True)
    """
)
READER = textwrap.dedent(
    """
    import sys, torch
    from kvbroker_client import BrokerClient

    with BrokerClient(sys.argv[1]) as broker:
        cache = broker.attach(sys.argv[2])
        with cache.pinned() as kv:     # pinned: never evicted or moved while in the block
            print(tuple(kv.shape), kv.dtype, float(kv.float().sum()), flush=True)
        cache.release(force=True)      # frees it (it was retained)
    """
)


def run(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_readmes_worker_and_another_process_share_a_cache_on_a_private_shm_dir(daemon):
    assert daemon.shm_dir != "/dev/shm" and os.path.dirname(daemon.shm_dir) == "/dev/shm"
    cache_id, written = run(WRITER, daemon.target).split()
    objects = daemon.shm_objects()
    assert objects, f"the segment lives in the daemon's own directory {daemon.shm_dir}"
    assert not any(name in os.listdir("/dev/shm") for name in objects)
    shape, dtype, read = run(READER, daemon.target, cache_id).rsplit(" ", 2)
    assert (shape, dtype) == ("(32, 2, 4096, 128)", "torch.float16")
    assert float(read) == float(written), "the reader sees the writer's bytes"
    with BrokerClient(daemon.target) as operator:
        assert cache_id not in {c.cache_id for c in operator.list_caches()}, "the reader freed it"


def test_a_client_that_cannot_reach_the_segment_gets_the_error_from_allocate_and_leaves_nothing(
    daemon, tmp_path, monkeypatch
):
    # A worker that does not share the daemon's shm directory (another container, a
    # private /dev/shm): it looks for the object somewhere the object is not.
    real = handles.host_path
    monkeypatch.setattr(handles, "host_path", lambda host, default: str(tmp_path / os.path.basename(real(host, default))))
    with BrokerClient(daemon.target) as operator:
        before = operator.stats().total_allocated_bytes
        with BrokerClient(daemon.target) as worker:
            with pytest.raises(StaleHandleError, match="does not exist") as raised:
                worker.allocate("default", size_bytes=1 << 20, retain=True, model_name="lost")
            assert "was allocated, then released again" in "".join(raised.value.__notes__)
            assert worker.core._held == {}, "the client holds nothing"
        assert [c.cache_id for c in operator.list_caches(model_name="lost")] == []
        assert operator.stats().total_allocated_bytes == before
