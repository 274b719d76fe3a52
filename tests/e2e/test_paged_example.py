"""The README's paged-pool example (``examples/cortexstream.py``: the cortexstream guide's
use cases) runs as written against a real daemon serving ``deploy/kvbroker.paged.toml``
on the host device, and leaves the pool empty."""

from __future__ import annotations

import subprocess
import sys

from kvbroker_client import BrokerClient
from tests.support.daemon import ROOT, child_env, daemon_fixture

daemon = daemon_fixture(config=(ROOT / "deploy" / "kvbroker.paged.toml").read_text(), scope="module")


def test_the_cortexstream_example_runs_and_cleans_up(daemon):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cortexstream.py")], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env=child_env({"KVBROKER_TARGET": daemon.target}),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in (
        "arena: 4 layers, 4 heads, head_dim 64, 256 blocks of 16 tokens, 4096 bytes a token",
        "memory: 4096 tokens = 256 blocks = 16 MiB; layer tensor (2, 256, 16, 4, 64)",
        "user_123: 160 tokens, K of layer 2 (160, 4, 64), all 3.0: True",
        "=== KVCache Statistics (pool llama) ===",
        "  user_123: 136/176 tokens, blocks [0, +11]",  # used: as of its last grant (ahead, at 136)
        "    " + "X" * 30 + "." * 34,
        "reject: 4000 tokens requested, 3616 free",
        "reduce: max_tokens 8000 -> 3616",
        "wait: allocated once 'reduced' was freed (1000 tokens)",
        "free twice: False; blocks used now 0",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    with BrokerClient(daemon.target, session_id="") as client:
        (paged,) = client.stats().paged_pools
        assert (paged.pool, paged.blocks_used, paged.sequences) == ("llama", 0, 0)
