"""The paged pool's end-to-end test on a GPU: the daemon's arena is device memory, two
worker processes map it through CUDA IPC, one writes K/V token by token through the
per-layer tensors, the other attaches the sequence and reads the same bytes, and an
eviction reaches both. Skipped without a GPU (it runs on the project's GPU machine)."""

from __future__ import annotations

import pytest

from tests.e2e.test_paged import CONFIG, Worker, WorkerError
from tests.support.daemon import running_daemon
from tests.support.wait import wait_until

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA_CONFIG = CONFIG.replace('host_capacity = "16MiB"', 'kind = "cuda"\ncuda_memory_fraction = 0.5')


def test_paged_pool_on_cuda_two_processes_share_tokens_and_see_an_eviction(tmp_path):
    with running_daemon(tmp_path, config=CUDA_CONFIG, devices="cuda") as daemon:
        a, b = Worker(daemon.target), Worker(daemon.target)
        try:
            a("allocate", seq="s", prompt=0, max_tokens=200, priority=0)
            assert a("write", seq="s", salt=5, tokens=60)["used"] == 60
            assert b("attach", seq="s") == 60
            assert b("check", seq="s", salt=5) == {"ok": True, "used": 60, "contiguous": True}
            b("allocate", seq="vip", prompt=256, priority=9)  # the whole arena: s is evicted
            wait_until(lambda: a("evicted", seq="s") and b("evicted", seq="s"), 20.0, "both holders learn of the eviction")
            with pytest.raises(WorkerError):
                a("check", seq="s", salt=5)
        finally:
            a.close()
            b.close()
