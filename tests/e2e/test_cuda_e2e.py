"""The whole product on a GPU: the daemon owns the GPU, two unrelated processes share a
cache through CUDA IPC both ways, and a defragment keeps the bytes. Skipped without a GPU
(it runs on the project's GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from kvbroker_client import BrokerClient

from tests.support.daemon import ROOT, running_daemon

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
MiB = 1 << 20

PRODUCER = textwrap.dedent(
    """
    import json, sys, torch
    from kvbroker_client import BrokerClient
    client = BrokerClient(sys.argv[1])
    caches = [client.allocate("default", dtype=torch.float16, shape=(256, 1024), retain=True) for _ in range(6)]
    for i, cache in enumerate(caches):
        t = cache.tensor()
        assert t.is_cuda, t.device
        t.fill_(float(i + 1))
    torch.cuda.synchronize()
    print(json.dumps([c.cache_id for c in caches]), flush=True)
    assert sys.stdin.readline().strip() == "check"
    t = caches[0].tensor()
    torch.cuda.synchronize()
    print("seen" if bool((t[5] == -2.0).all()) else "not seen", flush=True)
    """
)

CONSUMER = textwrap.dedent(
    """
    import json, sys, torch
    from kvbroker_client import BrokerClient
    client = BrokerClient(sys.argv[1])
    out = {}
    write = sys.argv[2] == "write"
    for i, cache_id in enumerate(sys.argv[3:]):
        cache = client.attach(cache_id)
        t = cache.tensor()
        out[cache_id] = [str(t.device), float(t.float().mean()), cache.handle.byte_offset]
        if i == 0 and write:
            t[5] = -2.0
            torch.cuda.synchronize()
        cache.release()
    print(json.dumps(out))
    """
)


def run(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cuda_zero_copy_between_processes_and_defragment(tmp_path):
    with running_daemon(tmp_path, devices="cuda", env={"KVBROKER_CUDA_MEMORY_FRACTION": "0.05"}) as daemon:
        daemon_devices = daemon.log()
        producer = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, daemon.target], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        ids = json.loads(producer.stdout.readline())
        consumer = run(CONSUMER, daemon.target, "write", *ids)
        assert consumer.returncode == 0, consumer.stderr
        seen = json.loads(consumer.stdout)
        assert [round(seen[i][1]) for i in ids] == [1, 2, 3, 4, 5, 6], seen
        assert all(v[0].startswith("cuda") for v in seen.values())
        producer.stdin.write("check\n")
        producer.stdin.flush()
        assert producer.stdout.readline().strip() == "seen", producer.stderr.read()
        producer.stdin.close()
        producer.wait(timeout=60)

        with BrokerClient(daemon.target) as operator:
            for cache_id in ids[1:5:2]:
                operator.release(cache_id, force=True)
            result = operator.defragment()
            assert result.caches_moved >= 1 and result.fragmentation_after == 0.0
            kept = [i for i in ids if i not in ids[1:5:2]]
            after = json.loads(run(CONSUMER, daemon.target, "read", *kept).stdout)
            means = {cid: round(v[1], 3) for cid, v in after.items()}
            assert means[ids[0]] != 1.0  # row 5 was overwritten with -2 by the consumer
            assert [means[c] for c in kept[1:]] == [1.0 * (ids.index(c) + 1) for c in kept[1:]]
            for cache_id in kept:
                operator.release(cache_id, force=True)
    assert "GPU-" in daemon_devices
