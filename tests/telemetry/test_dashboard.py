"""What a dashboard needs from /metrics: counters at 0 from the first scrape, the waiting
queue per pool, live sessions, caches by state, pool priority; and /healthz beside
/metrics with 404 for every other path."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbroker.server.convert import STATUS_FOR_ERROR
from kvbroker.server.registration import SERVICE
from kvbroker.telemetry.catalogue import CATALOGUE, Kind
from kvbroker.telemetry.prometheus import routes
from kvbroker.telemetry.recorder import ERROR_CODES, OUTCOMES
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.wire import SessionEndReason
from kvbroker_client import AllocationTimeout, BrokerClient
from tests.support.daemon import daemon_fixture
from tests.support.wait import wait_until

from .conftest import MiB, Telemetered
from .test_prometheus import samples, value

CONFIG = """
[devices]
host_capacity = "64MiB"

[[pools]]
name = "default"

[[pools]]
name = "tiny"
max_bytes = "4MiB"
segment_bytes = "4MiB"
block_bytes = "1MiB"
priority = 7
gc_threshold = 1.0
"""

fresh = daemon_fixture(config=CONFIG, metrics=True, scope="module")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_every_counter_is_exported_at_zero_from_the_first_scrape(fresh):
    status, text = get(fresh.metrics_url)
    assert status == 200
    seen = samples(text)
    names = {name for name, _ in seen}
    for spec in CATALOGUE:
        if spec.kind is Kind.COUNTER:
            assert spec.name in names, f"{spec.name} has no series before its first event"
    pools, devices = ("default", "tiny"), ("host",)
    for pool in pools:
        for outcome in OUTCOMES:
            assert seen[("kvbroker_allocations_total", frozenset({("pool", pool), ("outcome", outcome)}))] == 0
        for reason in ("idle", "policy", "reclaim", "threshold", "operator"):
            labels = {("pool", pool), ("device", devices[0]), ("policy", "lru"), ("reason", reason)}
            assert seen[("kvbroker_evictions_total", frozenset(labels))] == 0
    for reason in SessionEndReason:
        assert seen[("kvbroker_sessions_reclaimed_total", frozenset({("reason", reason.value)}))] == 0
    broker = ("service", "kvbroker.v1.CacheBroker")
    for method in ("Allocate", "Evict", "SetPoolLimits"):
        assert seen[("kvbroker_rpc_errors_total", frozenset({broker, ("method", method), ("code", "INTERNAL")}))] == 0
    assert value(text, "kvbroker_pool_priority", pool="tiny") == 7
    assert value(text, "kvbroker_sessions_active") == 0


def test_the_zero_error_codes_are_the_servicers_codes():
    assert set(ERROR_CODES) == {code.name for code in STATUS_FOR_ERROR.values()} | {"INTERNAL"}
    assert {m.name for m in SERVICE.methods} >= {"Allocate", "Evict", "SetPoolLimits", "Sessions"}


def test_waiting_queue_sessions_and_caches_by_state(fresh):
    with BrokerClient(fresh.target) as worker:
        worker.allocate("tiny", size_bytes=4 * MiB, pinned=True)
        kept = worker.allocate("default", size_bytes=MiB, retain=True)
        kept.release()  # retained, held by nobody: idle
        outcome: list[object] = []

        def wait_for_room() -> None:
            try:
                worker.allocate("tiny", size_bytes=4 * MiB, wait_timeout_ms=30_000)
            except AllocationTimeout as err:
                outcome.append(err)

        waiter = threading.Thread(target=wait_for_room)
        waiter.start()
        text = wait_until(
            lambda: (t := get(fresh.metrics_url)[1]) and value(t, "kvbroker_pool_waiting_allocations", pool="tiny") == 1
            and t, 20, "the metric shows the queued allocation",
        )  # fmt: skip
        assert value(text, "kvbroker_sessions_active") == 1
        states = {s: value(text, "kvbroker_pool_caches_by_state", pool="tiny", state=s)
                  for s in ("resident", "pending", "pinned", "idle_retained")}  # fmt: skip
        assert states == {"resident": 1, "pending": 0, "pinned": 1, "idle_retained": 0}
        assert value(text, "kvbroker_pool_caches_by_state", pool="default", state="idle_retained") == 1
        with BrokerClient(fresh.target, session_id="") as operator:
            request = pb.SetPoolLimitsRequest(pool="tiny", max_bytes=8 * MiB)
            operator.drive(operator.core.unary("SetPoolLimits", request))
        waiter.join(30)
        assert not outcome, "the waiting allocation was served once the quota was raised"
        text = get(fresh.metrics_url)[1]
        assert value(text, "kvbroker_pool_waiting_allocations", pool="tiny") == 0
        assert value(text, "kvbroker_pool_capacity_bytes", pool="tiny") == 8 * MiB


def test_healthz_beside_metrics_and_404_elsewhere(fresh):
    base = fresh.metrics_url.removesuffix("/metrics")
    assert get(base + "/healthz") == (200, "SERVING\n")
    assert get(base + "/metrics/")[0] == 200
    for path in ("/", "/metric", "/foo", "/healthz/x"):
        status, body = get(base + path)
        assert status == 404 and "/metrics" in body, path


def test_healthz_is_503_while_not_serving():
    replies: list[str] = []
    app = routes(lambda environ, start: [b"metrics"], serving=lambda: False)
    body = app({"PATH_INFO": "/healthz"}, lambda status, headers: replies.append(status))
    assert replies == ["503 Service Unavailable"] and body == [b"NOT_SERVING\n"]


@pytest.mark.usefixtures("telemetered")
def test_the_operations_daemon_shows_states_and_priority(telemetered: Telemetered):
    text = telemetered.scrape()
    assert value(text, "kvbroker_pool_caches_by_state", pool="small", state="pinned") == 2
    assert value(text, "kvbroker_pool_caches_by_state", pool="small", state="resident") == 2
    assert value(text, "kvbroker_pool_priority", pool="small") == 0
    assert value(text, "kvbroker_evictions_total", pool="small", device="host", policy="lru", reason="operator") == 0
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "kvbroker_pool_waiting_allocations" in names
