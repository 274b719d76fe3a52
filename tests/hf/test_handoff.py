"""Prefill in process A, decode in process B: two fresh interpreters (``tests/hf/worker.py``,
started with ``subprocess``, not forked from each other or from the test), a real daemon
between them. B continues from A's K/V without recomputing them, and its tokens are
those of one process doing both (``DynamicCache``); A may exit, or be SIGKILLed right
after the hand-off: the retained cache survives until B attaches, and B's close frees it.

Tolerance: B's first decoded token runs the last prompt token against A's cached prefix,
the single process runs it inside its prefill, so the two logits come from different
matrix shapes: they agree to ``LOGITS_ATOL`` absolute (float32; measured on the host:
about 1e-7), while the tokens must be identical.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from kvbroker_client import BrokerClient

from tests.hf.conftest import DEVICES
from tests.hf.model import generate, prompts, tiny_model
from tests.support.daemon import ROOT, child_env
from tests.support.wait import Lines, wait_until

#: Absolute tolerance on B's first-token logits, per device (float32 throughout).
LOGITS_ATOL = {"cpu": 1e-5, "cuda": 1e-4}
CHILD_TIMEOUT_S = 120


def worker(role: str, target: str, batch: int, device: str, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.hf.worker", role, target, str(batch), device, *flags],
        cwd=ROOT, env=child_env(), text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, sender_end", [(1, "exit"), (4, "sigkill")])
def test_decode_in_another_process_continues_the_prefill(broker, device, batch, sender_end):
    model = tiny_model(device)
    ids, mask = prompts(batch, device)
    expected, expected_logits = generate(model, ids, mask, DynamicCache(config=model.config))

    with BrokerClient(broker.target) as operator:
        sender = worker("prefill", broker.target, batch, device, *(["--stay"] if sender_end == "sigkill" else []))
        # Started at once so that its imports overlap the sender's; it reads the export
        # from stdin, written only once the sender is gone.
        receiver = worker("decode", broker.target, batch, device)
        try:
            exported_line = Lines(sender.stdout, "prefill worker").next(CHILD_TIMEOUT_S, "the export")
            assert exported_line, sender.stderr.read()
            exported = json.loads(exported_line)
            assert exported["lengths"] == [ids.shape[1] - 1] * 2
            if sender_end == "sigkill":
                sender.send_signal(signal.SIGKILL)
            expected_exit = -signal.SIGKILL if sender_end == "sigkill" else 0
            assert sender.wait(CHILD_TIMEOUT_S) == expected_exit, sender.stderr.read()
            # The sender's session is over (its hold is gone); the retained cache is not.
            wait_until(
                lambda: [(c.cache_id, c.holder_count) for c in operator.list_caches()] == [(exported["cache_id"], 0)],
                30, "the sender's hold ended and the retained cache stayed",
            )  # fmt: skip

            out, err = receiver.communicate(exported_line + "\n", timeout=CHILD_TIMEOUT_S)
            assert receiver.returncode == 0, err
            decoded = json.loads(out)
            assert decoded["tokens"] == expected
            logits = torch.tensor(decoded["logits"])
            torch.testing.assert_close(logits, expected_logits, rtol=0, atol=LOGITS_ATOL[device])
            assert operator.list_caches() == [], "the receiver's close freed the cache"
        finally:
            for process in (sender, receiver):
                if process.poll() is None:
                    process.kill()
                    process.wait()
