"""Two unrelated processes share one cache through the daemon, zero-copy, both ways."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kvbroker_client import BrokerClient

from tests.support.daemon import ROOT

PRODUCER = textwrap.dedent(
    """
    import sys, torch
    from kvbroker_client import BrokerClient
    client = BrokerClient(sys.argv[1])
    cache = client.allocate("default", dtype=torch.int32, shape=(1024, 256), retain=False)
    t = cache.tensor()
    t.copy_(torch.arange(t.numel(), dtype=torch.int32).view_as(t))
    print(cache.cache_id, flush=True)
    assert sys.stdin.readline().strip() == "check"
    # The consumer wrote -7 into row 3 through its own mapping: seen here without a copy.
    ok = bool((t[3] == -7).all()) and int(t[4, 0]) == 4 * 256
    print("seen" if ok else "not seen", flush=True)
    cache.release()
    print("released", flush=True)
    """
)

CONSUMER = textwrap.dedent(
    """
    import sys, torch
    from kvbroker_client import BrokerClient
    client = BrokerClient(sys.argv[1])
    cache = client.attach(sys.argv[2])
    t = cache.tensor()
    assert t.dtype == torch.int32 and tuple(t.shape) == (1024, 256), (t.dtype, t.shape)
    expected = torch.arange(t.numel(), dtype=torch.int32).view_as(t)
    print("same" if torch.equal(t, expected) else "different", flush=True)
    t[3] = -7
    cache.release()
    """
)


def run_python(code: str, *args: str, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


def test_unrelated_processes_share_bytes_both_ways(daemon):
    with BrokerClient(daemon.target) as operator:
        before = operator.stats().total_allocated_bytes
    producer = run_python(PRODUCER, daemon.target)
    cache_id = producer.stdout.readline().strip()
    assert cache_id, producer.stderr.read()

    consumer = run_python(CONSUMER, daemon.target, cache_id)
    out, err = consumer.communicate(timeout=60)
    assert consumer.returncode == 0, err
    assert out.strip() == "same"

    producer.stdin.write("check\n")
    producer.stdin.flush()
    assert producer.stdout.readline().strip() == "seen"
    assert producer.stdout.readline().strip() == "released"
    assert producer.wait(timeout=30) == 0, producer.stderr.read()

    with BrokerClient(daemon.target) as operator:
        assert operator.stats().total_allocated_bytes == before
        assert cache_id not in {c.cache_id for c in operator.list_caches()}


def test_release_frees_and_double_release_is_harmless(daemon):
    with BrokerClient(daemon.target) as client:
        before = client.stats().total_allocated_bytes
        cache = client.allocate("default", size_bytes=3 * 1024 * 1024)
        assert client.stats().total_allocated_bytes == before + 3 * 1024 * 1024
        assert cache.release() is True
        assert cache.release() is False
        assert client.release(cache.cache_id) is False
        assert client.stats().total_allocated_bytes == before


def test_a_cache_lives_while_another_process_holds_it(daemon):
    with BrokerClient(daemon.target) as a, BrokerClient(daemon.target) as b:
        cache = a.allocate("default", size_bytes=1 << 20)
        held = b.attach(cache.cache_id)
        cache.release()  # a's hold goes; b still holds it
        assert held.tensor().numel() == 1 << 20
        assert any(c.cache_id == cache.cache_id for c in a.list_caches())
        assert held.release() is True
