"""Persistent pools across daemon restarts (issue 13), with real daemons and real files.

- SIGTERM, then start: every cache of a persistent pool comes back byte-identical with
  its id, pool, model, dtype, shape, retain flag and priority; other pools' do not.
- ``kvbroker checkpoint``, writes, SIGKILL, then start: the caches are as checkpointed.
- A torn newest generation (a truncated file, a flipped byte, a file missing from its
  manifest) is never loaded: the previous one is, and the log and the metric say so.
- A checkpoint beyond ``persistence.max_bytes`` fails with a clear error and a metric,
  and the previous generation stays current.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1.broker_pb2_grpc import CacheBrokerStub
from kvbroker_client import BrokerClient
from tests.support.daemon import ROOT, child_env, start_daemon
from tests.support.tinyfs import tiny_filesystem
from tests.support.wait import wait_until

CONFIG = """
[devices]
host_capacity = "128MiB"

[persistence]
dir = "{dir}"
checkpoint_interval_seconds = {interval}
{extra}

[[pools]]
name = "kept"
persistent = true
segment_bytes = "32MiB"

[[pools]]
name = "default"
segment_bytes = "16MiB"
"""

#: (dtype, shape, retain, priority, model) of the caches each test writes.
CACHES = [
    (torch.bfloat16, (64, 1024), True, 7, "llama"),
    (torch.int32, (3, 5, 7), False, 0, ""),
    (torch.uint8, (1 << 20,), True, -3, "vista"),
]


def config(tmp_path: Path, extra: str = "", interval: float = 0) -> str:
    return CONFIG.format(dir=tmp_path / "checkpoints", extra=extra, interval=interval)


def fill(client: BrokerClient, seed: int) -> dict[str, bytes]:
    """Allocate ``CACHES`` in the persistent pool with random bytes; returns id -> bytes."""
    rng = np.random.default_rng(seed)
    written = {}
    for dtype, shape, retain, priority, model in CACHES:
        cache = client.allocate("kept", dtype=dtype, shape=shape, retain=retain, priority=priority, model_name=model)
        data = rng.integers(0, 256, cache.nbytes, dtype=np.uint8)
        cache.tensor(torch.uint8, (cache.nbytes,)).copy_(torch.from_numpy(data))
        written[cache.cache_id] = data.tobytes()
    return written


def overwrite(client: BrokerClient, cache_ids, seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for cache_id in cache_ids:
        cache = client.attach(cache_id)
        data = rng.integers(0, 256, cache.nbytes, dtype=np.uint8)
        cache.tensor(torch.uint8, (cache.nbytes,)).copy_(torch.from_numpy(data))
        out[cache_id] = data.tobytes()
    return out


def contents(client: BrokerClient, cache_id: str) -> bytes:
    cache = client.attach(cache_id)
    return cache.tensor(torch.uint8, (cache.nbytes,)).numpy().tobytes()


def checkpoint(daemon) -> pb.CheckpointResponse:
    with grpc.insecure_channel(daemon.target) as channel:
        return CacheBrokerStub(channel).Checkpoint(pb.CheckpointRequest(), timeout=60)


def metric(daemon, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(daemon.metrics_url, timeout=10).read().decode()
    match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_sigterm_then_start_restores_every_persistent_cache(tmp_path):
    daemon = start_daemon(tmp_path, config=config(tmp_path))
    try:
        with BrokerClient(daemon.target) as client:
            written = fill(client, seed=1)
            other = client.allocate("default", size_bytes=4096, retain=True).cache_id
            before = {c.cache_id: c for c in client.list_caches(pool="kept")}
            assert daemon.stop() == 0
    finally:
        daemon.stop()
    assert "checkpoint (shutdown): generation 1, 3 caches" in daemon.log()

    again = start_daemon(tmp_path, config=config(tmp_path), metrics=True)
    try:
        with BrokerClient(again.target) as client:
            after = {c.cache_id: c for c in client.list_caches()}
            assert set(after) == set(written), "exactly the persistent pool's caches come back"
            assert other not in after
            for cache_id, old in before.items():
                new = after[cache_id]
                for field in ("pool", "model_name", "dtype", "shape", "retain", "priority", "nbytes"):
                    assert getattr(new, field) == getattr(old, field), (cache_id, field)
                assert contents(client, cache_id) == written[cache_id]
            assert metric(again, "kvbroker_restored_caches_total") == 3
            # New caches get new ids, never a restored one's.
            fresh = client.allocate("kept", size_bytes=4096).cache_id
            assert fresh not in written
        assert again.stop() == 0
    finally:
        again.stop()


def test_sigkill_after_a_checkpoint_restores_the_checkpoint(tmp_path):
    daemon = start_daemon(tmp_path, config=config(tmp_path))
    try:
        with BrokerClient(daemon.target) as client:
            written = fill(client, seed=2)
            cli = subprocess.run(
                [sys.executable, "-m", "kvbroker", "--target", daemon.target, "checkpoint"],
                cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert cli.stdout.startswith("checkpoint generation 1: 3 caches"), cli.stdout
            overwrite(client, written, seed=3)  # after the checkpoint: lost by the crash
            daemon.process.kill()
            daemon.process.wait(timeout=30)
    finally:
        daemon.stop()

    again = start_daemon(tmp_path, config=config(tmp_path))
    try:
        with BrokerClient(again.target) as client:
            for cache_id, data in written.items():
                assert contents(client, cache_id) == data
        assert again.stop() == 0
    finally:
        again.stop()


def _two_generations(tmp_path: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Generation 1 with one content, generation 2 with another; then SIGKILL."""
    daemon = start_daemon(tmp_path, config=config(tmp_path))
    try:
        with BrokerClient(daemon.target) as client:
            first = fill(client, seed=4)
            assert checkpoint(daemon).generation == 1
            second = overwrite(client, first, seed=5)
            assert checkpoint(daemon).generation == 2
            daemon.process.kill()
            daemon.process.wait(timeout=30)
    finally:
        daemon.stop()
    return first, second


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)


def _flip(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _unlisted(path: Path) -> None:
    (path.parent / "extra.safetensors").write_bytes(path.read_bytes())


@pytest.mark.parametrize("tear", [_truncate, _flip, _unlisted], ids=["truncated", "flipped-byte", "unlisted-file"])
def test_a_torn_generation_is_never_loaded(tmp_path, tear):
    first, second = _two_generations(tmp_path)
    newest = tmp_path / "checkpoints" / "gen-000002"
    tear(sorted(newest.glob("*.safetensors"))[-1])

    again = start_daemon(tmp_path, config=config(tmp_path), metrics=True)
    try:
        assert "checkpoint generation 2 is not loaded" in again.log()
        assert metric(again, "kvbroker_checkpoint_generations_rejected_total") == 1
        with BrokerClient(again.target) as client:
            for cache_id, data in first.items():
                assert contents(client, cache_id) == data, "the previous generation, whole"
        assert again.stop() == 0
    finally:
        again.stop()


def test_a_checkpoint_beyond_the_budget_is_a_clear_error_and_a_metric(tmp_path):
    daemon = start_daemon(tmp_path, config=config(tmp_path, extra='max_bytes = "1MiB"'), metrics=True)
    try:
        with BrokerClient(daemon.target) as client:
            client.allocate("kept", size_bytes=2 << 20, retain=True)
            with pytest.raises(grpc.RpcError) as caught:
                checkpoint(daemon)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "persistence.max_bytes" in caught.value.details()
            assert metric(daemon, "kvbroker_checkpoints_total", '{outcome="budget_exceeded"}') == 1
            assert not list((tmp_path / "checkpoints").glob("gen-*")), "nothing left behind"
            wait_until(lambda: "checkpoint (requested" in daemon.log(), 10, "the failure is logged")
    finally:
        daemon.stop()


def test_a_full_disk_is_a_clear_error_and_a_metric_and_no_retry(tmp_path):
    with tiny_filesystem(tmp_path) as tiny:
        if tiny is None:
            pytest.skip("this machine does not let a test mount a small tmpfs")
        toml = CONFIG.format(dir=tiny / "checkpoints", extra="", interval=0)
        daemon = start_daemon(tmp_path, config=toml, metrics=True)
        try:
            with BrokerClient(daemon.target) as client:
                client.allocate("kept", size_bytes=1 << 20, retain=True)
                with pytest.raises(grpc.RpcError) as caught:
                    checkpoint(daemon)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "full" in caught.value.details()
                assert metric(daemon, "kvbroker_checkpoints_total", '{outcome="disk_full"}') == 1
                assert not list((tiny / "checkpoints").glob("gen-*")), "the partial generation is removed"
                assert daemon.log().count("checkpoint (requested") == 1, "one failure, one line: no retry"
        finally:
            daemon.stop()


def test_restored_caches_are_held_through_the_grace_then_the_usual_rules_apply(tmp_path):
    toml = config(tmp_path, extra="restore_grace_seconds = 5", interval=0.5)
    daemon = start_daemon(tmp_path, config=toml)
    try:
        with BrokerClient(daemon.target) as client:
            written = fill(client, seed=6)
            wanted = client.allocate("kept", size_bytes=8192).cache_id  # not retained
            unwanted = client.allocate("kept", size_bytes=8192).cache_id  # not retained
            wait_until(lambda: "checkpoint (periodic): generation" in daemon.log(), 30, "a periodic checkpoint")
            assert daemon.stop() == 0
    finally:
        daemon.stop()

    again = start_daemon(tmp_path, config=toml)
    try:
        with BrokerClient(again.target) as client:
            held = client.attach(wanted)  # the client re-attaches within the grace
            listed = {c.cache_id for c in client.list_caches()}
            assert {wanted, unwanted} | set(written) <= listed

            def unwanted_freed() -> bool:
                return unwanted not in {c.cache_id for c in client.list_caches()}

            wait_until(unwanted_freed, 60, "the grace ends and the unclaimed, unretained cache is freed")
            left = {c.cache_id: c for c in client.list_caches()}
            assert wanted in left and held.cache_id == wanted, "a re-attached cache stays"
            retained = {cid for cid, (_, _, retain, _, _) in zip(written, CACHES) if retain}
            assert retained <= set(left), "retained caches stay, as idle retained caches"
            assert all("~restored" not in c.holders for c in left.values())
        assert again.stop() == 0
    finally:
        again.stop()


def test_checkpoint_without_a_persistent_pool_says_so(tmp_path):
    daemon = start_daemon(tmp_path, config='[[pools]]\nname = "default"\n')
    try:
        with pytest.raises(grpc.RpcError) as caught:
            checkpoint(daemon)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no pool is persistent" in caught.value.details()
    finally:
        daemon.stop()


def test_an_unusable_directory_stops_the_start_with_its_key(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = subprocess.run(
        [sys.executable, "-m", "kvbroker", "serve", "--devices", "host", "--listen", "", "--metrics-listen", "",
         "--unix-socket", str(tmp_path / "s.sock"), "--persistence-dir", str(blocker / "sub"), "--config",
         str(_write(tmp_path, '[[pools]]\nname = "kept"\npersistent = true\n'))],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "persistence.dir: cannot create" in done.stderr


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvbroker.toml"
    path.write_text(text)
    return path
