"""/metrics of a real daemon: promtool accepts it, the values match the known operations,
and a real Prometheus server scrapes it and answers queries about it."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kvbroker.telemetry.catalogue import CATALOGUE, Kind
from tests.support.daemon import free_port
from tests.support.wait import wait_until

from .conftest import MiB, Telemetered, need_tool


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_promtool_accepts_the_exposition(telemetered: Telemetered) -> None:
    promtool = need_tool("promtool")
    done = subprocess.run([promtool, "check", "metrics"], input=telemetered.scrape(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_catalogue_metric_is_exposed_with_its_kind(telemetered: Telemetered) -> None:
    families = {f.name: f for f in text_string_to_metric_families(telemetered.scrape())}
    for spec in CATALOGUE:
        family = families.get(spec.base_name)
        assert family is not None, spec.name
        # The text format has no info type: an info metric is a gauge named *_info.
        assert family.type == ("gauge" if spec.kind is Kind.INFO else spec.kind.value), spec.name
        assert family.documentation == spec.help
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(spec.labels), (spec.name, sample)


def test_values_follow_the_known_operations(telemetered: Telemetered) -> None:
    text = telemetered.scrape()
    v = lambda name, **labels: value(text, name, **labels)  # noqa: E731
    # Gauges, read from the stats snapshot at scrape time.
    assert v("kvbroker_device_capacity_bytes", device="host") == 256 * MiB
    assert v("kvbroker_pool_allocated_bytes", pool="small") == 16 * MiB
    assert v("kvbroker_pool_pinned_bytes", pool="small") == 16 * MiB
    assert v("kvbroker_pool_utilization_ratio", pool="small") == 1.0
    assert v("kvbroker_pool_caches", pool="frag") == 2
    assert v("kvbroker_pool_fragmentation_ratio", pool="frag") == 0.0  # compacted
    assert v("kvbroker_pool_allocated_bytes", pool="default") == 0
    # Counters kept by the core.
    assert v("kvbroker_evictions_total", pool="small", device="host", policy="lru", reason="policy") == 1
    assert v("kvbroker_evicted_bytes_total", pool="small", device="host", policy="lru", reason="policy") == 8 * MiB
    assert v("kvbroker_releases_total", pool="default", device="host") == 1
    assert v("kvbroker_releases_total", pool="frag", device="host") == 2
    assert v("kvbroker_compactions_total", pool="frag", device="host") == 1
    assert v("kvbroker_compaction_moved_bytes_total", pool="frag", device="host") == telemetered.defrag.bytes_moved
    # Counters and histograms fed by the hooks.
    assert v("kvbroker_allocations_total", pool="small", outcome="ok") == 3
    assert v("kvbroker_allocations_total", pool="small", outcome="exhausted") == 1
    assert v("kvbroker_allocations_total", pool="small", outcome="timeout") == 1
    assert v("kvbroker_allocations_total", pool="", outcome="not_found") == 1
    assert v("kvbroker_allocation_wait_seconds_count", pool="small") == 1
    assert 0.3 <= v("kvbroker_allocation_wait_seconds_sum", pool="small") < 2.0
    assert v("kvbroker_compaction_duration_seconds_count", device="host") == 1
    broker = {"service": "kvbroker.v1.CacheBroker"}
    assert v("kvbroker_rpc_errors_total", **broker, method="Allocate", code="NOT_FOUND") == 1
    assert v("kvbroker_rpc_errors_total", **broker, method="Allocate", code="DEADLINE_EXCEEDED") == 1
    assert v("kvbroker_rpc_duration_seconds_count", **broker, method="Allocate", code="OK") == 8
    assert v("kvbroker_rpc_duration_seconds_count", **broker, method="Defragment", code="OK") == 1
    assert ("kvbroker_build_info", frozenset({("version", __import__("kvbroker").__version__),
                                              ("python", __import__("platform").python_version())})) in samples(text)  # fmt: skip


def test_no_cache_or_session_id_is_a_label(telemetered: Telemetered) -> None:
    text = telemetered.scrape()
    label_values = {v for (_, labels) in samples(text) for _, v in labels}
    assert not {"s1", "s2", "s3", "f1", "f2", "f3", "f4"} & label_values


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def test_a_real_prometheus_scrapes_the_daemon(telemetered: Telemetered, tmp_path) -> None:
    prometheus = need_tool("prometheus")
    target = urllib.parse.urlparse(telemetered.metrics_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: kvbroker\n    static_configs:\n      - targets: ['{target}']\n"
    )
    need_tool("promtool")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        query = urllib.parse.quote('kvbroker_allocations_total{pool="small",outcome="ok"}')

        def series_scraped() -> list:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                return _get(f"{api}/query?query={query}")["data"]["result"]
            except OSError:  # not listening yet
                return []

        result = wait_until(series_scraped, 40, "Prometheus has scraped the daemon and answers the query",
                            interval=0.2)  # fmt: skip
        (series,) = result
        assert series["metric"]["job"] == "kvbroker" and series["metric"]["instance"] == target
        assert float(series["value"][1]) == 3
        targets = _get(f"{api}/targets")["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        quantile = urllib.parse.quote(
            'histogram_quantile(0.5, sum by (le) (kvbroker_rpc_duration_seconds_bucket{method="Allocate"}))'
        )
        (p50,) = _get(f"{api}/query?query={quantile}")["data"]["result"]
        assert 0 < float(p50["value"][1]) < 1.0
        moved = urllib.parse.quote("sum(kvbroker_compaction_moved_bytes_total)")
        (total,) = _get(f"{api}/query?query={moved}")["data"]["result"]
        assert float(total["value"][1]) == telemetered.defrag.bytes_moved
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        log.close()


def test_sessions_opened_and_reclaimed_are_counted(telemetered: Telemetered) -> None:
    import grpc

    from kvbroker.v1 import broker_pb2 as pb
    from kvbroker.v1 import broker_pb2_grpc

    before = samples(telemetered.scrape())
    opened = before[("kvbroker_sessions_opened_total", frozenset())]
    closed_key = ("kvbroker_sessions_reclaimed_total", frozenset({("reason", "stream_closed")}))
    with grpc.insecure_channel(telemetered.daemon.target) as channel:
        stream = broker_pb2_grpc.CacheBrokerStub(channel).Watch(
            pb.WatchRequest(client_name="telemetry-test"), metadata=(("kvbroker-session-id", "telemetry-s1"),)
        )
        next(stream)  # SESSION_OPENED
        stream.cancel()
    after = wait_until(
        lambda: (a := samples(telemetered.scrape())).get(closed_key, 0) == before.get(closed_key, 0) + 1 and a,
        10, "the closed stream's session is counted as reclaimed",
    )
    assert after[("kvbroker_sessions_opened_total", frozenset())] == opened + 1
    assert after[closed_key] == before.get(closed_key, 0) + 1
