"""The README's hand-off example (``examples/prefill_decode.py``: a prefill worker and a
decode worker, two processes) runs as written against a daemon with a ``default`` pool,
decodes what one process would, and leaves no cache behind."""

from __future__ import annotations

import subprocess
import sys

from kvbroker_client import BrokerClient

from tests.support.daemon import ROOT, child_env


def test_the_prefill_decode_example_runs_and_cleans_up(host_daemon):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prefill_decode.py")], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=child_env({"KVBROKER_TARGET": host_daemon.target}),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for text in ('hand-off: {"format": "kvbroker.kv/1"', "decode worker: attached 47 cached tokens",
                 "decode worker: 32 tokens in ", "same tokens as one process doing both: yes"):  # fmt: skip
        assert text in done.stdout, done.stdout
    assert "prefill worker: 47 tokens in cache" in done.stderr
    with BrokerClient(host_daemon.target) as operator:
        assert operator.list_caches() == []
