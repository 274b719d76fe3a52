"""Issue 13: clients that ride through a daemon that is not up yet, or that restarts.

Real daemons (``tests/client/daemon.py``), real worker processes (``worker.py``), real
restarts on the same socket (SIGTERM then start, SIGKILL then start). The user makes no
call but using its caches: the client opens its session when the daemon comes up, opens
a new one after a restart, re-attaches what survived by id, raises ``CacheLost`` for
what did not, and never lets an old view write into bytes the broker gave to another
client (they are re-mapped to private memory when the hold ends).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvbroker_client import BrokerClient, CacheLost, SessionLost
from kvbroker_client.core import Phase
from tests.support.daemon import ROOT, child_env
from tests.support.wait import until

from .daemon import MiB, Daemon, start_daemon, wait_until

OPEN_TIMEOUT_S = 20.0  # the channel retries every 2 s at most; generous for a loaded machine


class Worker:
    """``tests/client/worker.py`` in its own process: its own client and session."""

    def __init__(self, target: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.client.worker", target], cwd=ROOT, text=True, env=child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def __call__(self, op: str, **command: object) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **command}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"worker died: {self.process.stderr.read()[-4000:]}"
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def sock() -> Iterator[Path]:
    """A socket path that outlives one daemon (pytest's tmp_path can be too long)."""
    directory = tempfile.mkdtemp(prefix="kvb-restart-", dir="/tmp")
    yield Path(directory) / "kvb.sock"
    shutil.rmtree(directory, ignore_errors=True)


def test_an_old_view_never_writes_into_the_next_tenants_bytes(tmp_path):
    """The issue's bug: a worker's session ends (here its lease lapses, as when it never
    opened), the broker hands the same bytes to another client, and the worker keeps
    writing through the view it kept. The second client's bytes must stay its own. (A
    3 s lease: short for the test, long enough that the busy test process's own client
    keeps its session on a loaded machine.)"""
    daemon = start_daemon(tmp_path / "d", "--lease-seconds", "3")
    worker = Worker(daemon.target)
    try:
        mine = worker("allocate", size_bytes=MiB, value=1)["ok"]
        assert "lease_expired" in worker("lapse")["ok"]
        with BrokerClient(daemon.target) as second:
            theirs = second.allocate(size_bytes=MiB)
            place = [theirs.handle.segment_id, theirs.handle.segment_generation, theirs.handle.byte_offset]
            assert place == mine["place"], "the broker gave the freed bytes to the second client"
            theirs.tensor().fill_(7)

            assert worker("write_old", cache_id=mine["cache_id"], value=3) == {"ok": True}, "no crash"
            assert sorted({int(b) for b in theirs.tensor().unique()}) == [7], "the first wrote into them"
            assert worker("read_old", cache_id=mine["cache_id"]) == {"ok": [3]}, "its own private copy"
            used = worker("use", cache_id=mine["cache_id"])
            assert used["error"] == "CacheLost" and "lease_expired" in used["message"]
    finally:
        worker.close()
        assert daemon.stop() == 0, daemon.log()


def test_a_client_created_before_the_daemon_opens_its_session_when_it_comes_up(tmp_path, sock):
    client = BrokerClient(f"unix://{sock}", timeout_s=10)
    daemon: Daemon | None = None
    try:
        assert client.core.phase is Phase.CONNECTING, "the constructor did not wait for a daemon"
        daemon = start_daemon(tmp_path / "d", "--lease-seconds", "2", socket_path=sock)
        wait_until(lambda: client.core.phase is Phase.OPEN, OPEN_TIMEOUT_S, "session open, no call made")
        cache = client.allocate(size_bytes=MiB)
        cache.tensor().fill_(4)

        with BrokerClient(daemon.target, session_id="") as operator:
            def ours():
                return next((s for s in operator.sessions().sessions if s.session_id == client.session_id), None)

            # Two and a half leases later the session is the same one, watched and holding.
            wait_until(lambda: (s := ours()) is not None and s.age_seconds > 5.0, 30.0, "2.5 leases")
            session = ours()
            assert session.watching and session.holds == 1
        assert client.core.sessions_lost == 0 and not cache.lost
        assert sorted({int(b) for b in cache.tensor().unique()}) == [4]
    finally:
        client.close()
        if daemon is not None:
            assert daemon.stop() == 0, daemon.log()


def _clean_after_kill(daemon: Daemon) -> None:
    """A SIGKILLed daemon leaves its segments in its private shm directory."""
    for name in daemon.shm_objects():
        os.unlink(os.path.join(daemon.shm_dir, name))
    daemon.stop()
    shutil.rmtree(daemon.shm_dir, ignore_errors=True)


def _point(link: Path, socket_path: Path) -> None:
    """Make ``link`` (the path the client dials) lead to ``socket_path``, atomically."""
    temporary = link.with_name(link.name + ".new")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(socket_path)
    os.replace(temporary, link)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_client_rides_through_a_daemon_restart(tmp_path, sock, signal_name):
    """The client dials a symlink to the daemon's socket, so the restarted daemon can be
    given, before the client reaches it, what a persistent pool would have restored: a
    cache of the same id, retained, held by nobody (an operator creates it)."""
    link = sock.with_name("dial.sock")
    _point(link, sock.with_name("first.sock"))
    daemon = start_daemon(tmp_path / "first", socket_path=sock.with_name("first.sock"))
    client = BrokerClient(f"unix://{link}", timeout_s=10)
    restarted: Daemon | None = None
    try:
        plain = client.allocate(size_bytes=MiB)
        kept = client.allocate(size_bytes=2 * MiB, retain=True, model_name="m")
        survivor = client.allocate(size_bytes=MiB, retain=True, model_name="m")
        old_view = plain.tensor()
        old_view.fill_(9)
        survivor.tensor().fill_(9)
        old_instance = plain.handle.instance_id

        if signal_name == "SIGTERM":
            assert daemon.stop() == 0, daemon.log()
        else:
            daemon.process.kill()
            daemon.process.wait()
        wait_until(lambda: client.core.sessions_lost == 1, 15.0, "session lost")
        assert sorted({int(b) for b in old_view.unique()}) == [0], "the view no longer reaches the segment"
        with pytest.raises(SessionLost, match="no new session is open yet"):
            plain.tensor()  # the daemon is down: whether it survived is not known yet

        restarted = start_daemon(tmp_path / "second", socket_path=sock.with_name("second.sock"))
        with BrokerClient(restarted.target, session_id="", timeout_s=30) as operator:
            back = operator.allocate(size_bytes=MiB, retain=True, model_name="m", cache_id=survivor.cache_id)
            back.tensor().fill_(5)
            back.release()
            _point(link, sock.with_name("second.sock"))
            wait_until(
                lambda: client.core.phase is Phase.OPEN and client.core.instance_id not in ("", old_instance),
                OPEN_TIMEOUT_S, "session open on the new daemon, no call made",
            )  # fmt: skip

            # Held again at once, in the background, with no call by the user.
            def holders() -> dict[str, list[str]]:
                return {c.cache_id: list(c.holders) for c in operator.list_caches()}

            wait_until(lambda: holders() == {survivor.cache_id: [client.session_id]}, 15.0, "re-attached")
        assert not survivor.lost and survivor.handle.instance_id == client.core.instance_id
        assert sorted({int(b) for b in survivor.tensor().unique()}) == [5], "re-mapped on the new daemon"
        for gone in (plain, kept):
            with pytest.raises(CacheLost, match="restarted without it"):
                gone.tensor()
            with pytest.raises(CacheLost):
                gone.tensor()  # and stays lost, without another call

        fresh = client.allocate(size_bytes=MiB)
        assert sorted({int(b) for b in fresh.tensor().unique()}) == [0]
        assert survivor.release(force=True) is True
    finally:
        client.close()
        if restarted is not None:
            assert restarted.stop() == 0, restarted.log()
        if signal_name == "SIGKILL":
            _clean_after_kill(daemon)
        daemon.stop()


def test_a_cache_the_background_reattach_did_not_find_stays_lost(tmp_path, sock):
    """What the re-attach at the new session's opening found stands: a cache of that id
    created on the restarted daemon afterwards is another cache for this object
    (``CacheLost``), which the worker may attach by id itself."""
    daemon = start_daemon(tmp_path / "first", socket_path=sock)
    client = BrokerClient(daemon.target, timeout_s=10)
    restarted: Daemon | None = None
    try:
        survivor = client.allocate(size_bytes=MiB, retain=True, model_name="m")
        old_instance = survivor.handle.instance_id
        assert daemon.stop() == 0, daemon.log()
        restarted = start_daemon(tmp_path / "second", socket_path=sock)
        wait_until(lambda: client.core.phase is Phase.OPEN and client.core.instance_id != old_instance,
                   OPEN_TIMEOUT_S, "session open on the new daemon")  # fmt: skip
        wait_until(lambda: survivor.evicted, 15.0, "the background re-attach found nothing")
        with BrokerClient(restarted.target, session_id="", timeout_s=30) as operator:
            operator.allocate(size_bytes=MiB, retain=True, model_name="m", cache_id=survivor.cache_id).release()
        with pytest.raises(CacheLost, match="restarted without it"):
            survivor.tensor()  # what the background attempt found stands: no second guess
        again = client.attach(survivor.cache_id)  # the worker may attach it by id itself
        assert again.handle.instance_id == client.core.instance_id
        assert again.release(force=True) is True
    finally:
        client.close()
        if restarted is not None:
            assert restarted.stop() == 0, restarted.log()
        daemon.stop()


def test_an_asyncio_client_rides_through_a_restart_too(tmp_path, sock):
    """The asyncio transport: the same rules; ``tensor()`` cannot call, ``refresh()`` does.
    Daemons are stopped and started on the main thread (their death signal follows the
    thread that started them), blocking the loop meanwhile."""
    import asyncio

    from kvbroker_client import AsyncBrokerClient

    daemon = start_daemon(tmp_path / "first", socket_path=sock)
    restarted: list[Daemon] = []

    async def scenario() -> None:
        async with AsyncBrokerClient(daemon.target, timeout_s=10) as client:
            plain = await client.allocate(size_bytes=MiB)
            kept = await client.allocate(size_bytes=MiB, retain=True)
            old_view = plain.tensor()
            old_view.fill_(9)
            old_instance = plain.handle.instance_id
            assert daemon.stop() == 0, daemon.log()
            await until(lambda: client.core.sessions_lost == 1, timeout=15.0, what="session lost")
            assert sorted({int(b) for b in old_view.unique()}) == [0]
            restarted.append(start_daemon(tmp_path / "second", socket_path=sock))
            await until(lambda: client.core.phase is Phase.OPEN and client.core.instance_id != old_instance,
                        timeout=OPEN_TIMEOUT_S, what="session open on the new daemon")  # fmt: skip
            await until(lambda: kept.evicted, timeout=15.0, what="the background re-attach found nothing")
            with pytest.raises(CacheLost, match="restarted without it"):
                kept.tensor()  # no call from tensor()
            with pytest.raises(CacheLost, match="restarted without it"):
                await kept.refresh()
            with pytest.raises(CacheLost, match="restarted without it"):
                await plain.refresh()
            fresh = await client.allocate(size_bytes=MiB)
            assert fresh.handle.instance_id == client.core.instance_id

    try:
        asyncio.run(scenario())
    finally:
        for again in restarted:
            assert again.stop() == 0, again.log()
        daemon.stop()
