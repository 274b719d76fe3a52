"""Persistent pools on a GPU: a cache written through CUDA IPC survives a SIGTERM and
a start byte for byte (the CUDA backend's ``read_into``/``write_from``). Skipped without
a GPU (it runs on the project's GPU machine)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.support.daemon import ROOT, child_env, start_daemon

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = """
[persistence]
dir = "{dir}"
checkpoint_interval_seconds = 0

[[pools]]
name = "kept"
persistent = true
"""

WRITER = textwrap.dedent(
    """
    import hashlib, sys, torch
    from kvbroker_client import BrokerClient
    client = BrokerClient(sys.argv[1])
    cache = client.allocate("kept", dtype=torch.bfloat16, shape=(1024, 4096), retain=True)
    g = torch.Generator(device="cuda").manual_seed(13)
    t = cache.tensor()
    t.copy_(torch.randn(t.shape, generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16))
    torch.cuda.synchronize()
    print(cache.cache_id, hashlib.blake2b(t.view(torch.uint8).cpu().numpy().tobytes()).hexdigest(), flush=True)
    """
)

READER = textwrap.dedent(
    """
    import hashlib, sys, torch
    from kvbroker_client import BrokerClient
    client = BrokerClient(sys.argv[1])
    cache = client.attach(sys.argv[2])
    t = cache.tensor()
    assert t.is_cuda and t.dtype == torch.bfloat16 and tuple(t.shape) == (1024, 4096), (t.device, t.dtype, t.shape)
    print(hashlib.blake2b(t.view(torch.uint8).cpu().numpy().tobytes()).hexdigest(), flush=True)
    """
)


def run(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_gpu_cache_survives_a_restart_byte_for_byte(tmp_path):
    config = CONFIG.format(dir=tmp_path / "checkpoints")
    daemon = start_daemon(tmp_path, config=config, devices="cuda", grace_seconds=60)
    try:
        cache_id, digest = run(WRITER, daemon.target).split()
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    again = start_daemon(tmp_path, config=config, devices="cuda", grace_seconds=60)
    try:
        assert run(READER, again.target, cache_id) == digest
        assert again.stop() == 0
    finally:
        again.stop()
