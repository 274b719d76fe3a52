"""Seed 004's operator actions against a real daemon (issue 13): ending old sessions
(``kvbroker sessions --end-older-than``, the EndSessions RPC) with their clients riding
through it, and the recent errors ``kvbroker stats`` shows."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

import pytest

from kvbroker.cli.ending import age
from kvbroker.config import ConfigError, load_config
from kvbroker_client import BrokerClient, CacheLost, InvalidRequest
from kvbroker_client.core import Phase
from tests.support.daemon import ROOT, child_env, running_daemon
from tests.test_readme import section, shell_lines
from tests.support.wait import wait_until

from .test_commands import kvbroker

MiB = 1 << 20
CONFIG = """
[devices]
host_capacity = "32MiB"

[[pools]]
name = "default"
segment_bytes = "16MiB"
block_bytes = "1MiB"
"""


def test_ages_parse_with_units_and_refuse_nonsense() -> None:
    assert [age(t) for t in ("90", "90s", "30m", "1h", "2d", "1.5h")] == [90, 90, 1800, 3600, 172800, 5400]
    for bad in ("", "1y", "-1h", "0", "h", "1 hour"):
        with pytest.raises(argparse.ArgumentTypeError):
            age(bad)


def test_ending_old_sessions_frees_their_caches_and_the_client_carries_on(tmp_path):
    with running_daemon(tmp_path / "d", config=CONFIG) as daemon, BrokerClient(daemon.target) as client, \
            BrokerClient(daemon.target, session_id="") as operator:  # fmt: skip
        kept = client.allocate(size_bytes=MiB, retain=True)
        gone = client.allocate(size_bytes=MiB)
        kept.tensor().fill_(5)
        old_view = gone.tensor()
        old_view.fill_(1)
        first_session = client.session_id

        def age_of_client() -> float:
            return next((s.age_seconds for s in operator.sessions().sessions if s.session_id == first_session), 0.0)

        wait_until(lambda: age_of_client() >= 1.0, 10.0, "the session is a second old")
        assert "no sessions" not in kvbroker(daemon.target, "sessions").stdout
        too_young = kvbroker(daemon.target, "sessions", "--end-older-than", "1h").stdout
        assert too_young.strip() == "ended 0 sessions; 0 non-retained caches freed"
        dry = kvbroker(daemon.target, "sessions", "--end-older-than", "1s", "--dry-run").stdout
        assert first_session in dry and "would end 1 session (dry run: nothing ended)" in dry
        assert client.core.sessions_lost == 0 and not gone.lost

        done = json.loads(kvbroker(daemon.target, "--json", "sessions", "--end-older-than", "1s").stdout)
        assert [s["session_id"] for s in done["sessions"]] == [first_session]
        assert done["caches_freed"] == 1
        assert "ended_by_operator" in daemon.log()

        # The client learns it from its stream, with no call of its own, and carries on.
        wait_until(lambda: client.core.sessions_lost == 1 and client.core.phase is Phase.OPEN, 15.0, "new session")
        assert "ended_by_operator" in client.core.last_loss
        assert sorted({int(b) for b in old_view.unique()}) == [0], "the freed cache's view was taken back"
        with pytest.raises(CacheLost, match="ended_by_operator"):
            gone.tensor()
        assert sorted({int(b) for b in kept.tensor().unique()}) == [5], "retained: re-attached on next use"
        ours = [s for s in operator.sessions().sessions if s.session_id == client.session_id]
        assert len(ours) == 1 and ours[0].holds == 1 and client.session_id != first_session

        with pytest.raises(InvalidRequest, match="ending every session is refused"):
            operator.end_sessions()
        with pytest.raises(InvalidRequest, match="session_ids"):
            operator.end_sessions(session_ids=["not an id"])
        assert kvbroker(daemon.target, "sessions", "--dry-run", ok=False).returncode == 2
        assert kvbroker(daemon.target, "sessions", "--end-older-than", "soon", ok=False).returncode == 2
        kept.release(force=True)


def test_stats_keeps_the_last_errors(tmp_path):
    with running_daemon(tmp_path / "d", "--recent-errors", "3", config=CONFIG) as daemon, \
            BrokerClient(daemon.target, session_id="") as client:  # fmt: skip
        assert client.stats().errors_total == 0 and not client.stats().recent_errors
        for i in range(5):
            with pytest.raises(LookupError):
                client.attach(f"missing-{i}")
        stats = client.stats()
        assert stats.errors_total == 5
        assert [(e.method, e.code) for e in stats.recent_errors] == [("Attach", "NOT_FOUND")] * 3
        for entry, expected in zip(stats.recent_errors, ("missing-4", "missing-3", "missing-2"), strict=True):
            assert expected in entry.message, "newest first"
        assert stats.recent_errors[0].time.seconds > 0
        text = kvbroker(daemon.target, "stats").stdout
        assert "Recent errors (3 shown of 5 since the start), newest first:" in text
        assert "NOT_FOUND" in text and "missing-4" in text


def test_the_number_of_recent_errors_is_configured_like_every_key(tmp_path):
    assert load_config(environ={}).recent_errors == 100
    assert load_config(environ={"KVBROKER_RECENT_ERRORS": "7"}).recent_errors == 7
    (tmp_path / "k.toml").write_text("[server]\nrecent_errors = 9\n")
    assert load_config(path=str(tmp_path / "k.toml"), environ={}).recent_errors == 9
    with pytest.raises(ConfigError, match=r"RECENT_ERRORS: must be in \[0, 100000\]"):
        load_config(environ={"KVBROKER_RECENT_ERRORS": "-1"})  # the message names the variable


def test_the_readme_operator_commands_run_as_written(tmp_path):
    """The ``sh`` block of the README's section on restarts and clean-up, against a
    daemon with the default configuration."""
    lines = shell_lines(section("Restarts, lost sessions and clean-up"))
    assert any("--end-older-than 1h" in line for line in lines)
    with running_daemon(tmp_path / "d", host_capacity="64MiB") as daemon:
        env = child_env({"KVBROKER_TARGET": daemon.target})
        for line in lines:
            words = shlex.split(line)
            assert words[0] == "kvbroker"
            done = subprocess.run([sys.executable, "-m", "kvbroker", *words[1:]], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            assert done.returncode == 0, f"{line}:\n{done.stdout}\n{done.stderr}"
