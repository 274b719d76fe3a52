"""Revoking views (kvbroker_client/revoke.py): which pages are taken back, and that one
holder's end never takes bytes from another holder in the same process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvbroker_client import BrokerClient
from kvbroker_client.revoke import PAGE, uncovered

from .daemon import MiB, Daemon, start_daemon


def test_uncovered_keeps_every_page_another_range_touches() -> None:
    assert uncovered(0, 4 * PAGE, []) == [(0, 4 * PAGE)]
    assert uncovered(10, 4 * PAGE - 1, []) == [(PAGE, 3 * PAGE)], "partial edge pages stay shared"
    assert uncovered(0, 4 * PAGE, [(PAGE + 1, PAGE + 2)]) == [(0, PAGE), (2 * PAGE, 4 * PAGE)]
    assert uncovered(0, 4 * PAGE, [(0, 4 * PAGE)]) == []
    assert uncovered(0, 2 * PAGE, [(3 * PAGE, 5 * PAGE)]) == [(0, 2 * PAGE)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("revoke"))
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def test_a_release_takes_the_views_back_but_not_another_holders_in_this_process(daemon):
    with BrokerClient(daemon.target) as first, BrokerClient(daemon.target) as second:
        only_mine = first.allocate(size_bytes=MiB)
        shared = first.allocate(size_bytes=MiB)
        mine_view, shared_view = only_mine.tensor(), shared.tensor()
        mine_view.fill_(1)
        shared_view.fill_(2)
        theirs = second.attach(shared.cache_id)
        their_view = theirs.tensor()

        only_mine.release()
        shared.release()
        assert sorted({int(b) for b in mine_view.unique()}) == [0], "held by nobody here: taken back"
        their_view.fill_(6)  # the second client still holds it: its view still reaches the cache
        assert sorted({int(b) for b in theirs.tensor().unique()}) == [6]
        with BrokerClient(daemon.target) as third:
            assert sorted({int(b) for b in third.attach(shared.cache_id).tensor().unique()}) == [6]
