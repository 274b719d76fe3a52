"""The catalogue: Prometheus naming rules, the OTLP form of every name, the docs table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvbroker.telemetry.catalogue import BY_NAME, CATALOGUE, Kind, MetricSpec, naming_problems, reference_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda s: s.name)
def test_every_name_follows_the_prometheus_conventions(spec: MetricSpec) -> None:
    assert naming_problems(spec) == []


def test_names_are_unique() -> None:
    assert len(BY_NAME) == len(CATALOGUE)
    assert len({s.otel_name for s in CATALOGUE}) == len(CATALOGUE)


def test_the_naming_check_catches_bad_names() -> None:
    bad = [
        MetricSpec("kvbroker_evictions", Kind.COUNTER, "", "x."),  # counter without _total
        MetricSpec("kvbroker_used", Kind.GAUGE, "bytes", "x."),  # unit not a suffix
        MetricSpec("kvbroker_wait_ms", Kind.GAUGE, "milliseconds", "x."),  # not a base unit
        MetricSpec("kvbroker_free_bytes", Kind.GAUGE, "", "x."),  # undeclared unit
        MetricSpec("vllm:kv_usage", Kind.GAUGE, "", "x."),  # prefix, colon
        MetricSpec("kvbroker_x", Kind.GAUGE, "", "x.", ("cache_id",)),  # unbounded label
        MetricSpec("kvbroker_t_seconds", Kind.HISTOGRAM, "seconds", "x.", (), (2.0, 1.0)),
    ]
    for spec in bad:
        assert naming_problems(spec), spec.name


def prometheus_name_of_otlp(name: str, unit: str, kind: Kind) -> str:
    """The OpenTelemetry -> Prometheus name translation (the compatibility spec, as a
    collector's Prometheus exporter applies it with unit suffixes on)."""
    out = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    suffix = {"By": "bytes", "s": "seconds"}.get(unit, "")
    if unit == "1" and kind is Kind.GAUGE:
        suffix = "ratio"
    if suffix and not out.endswith("_" + suffix):
        out += "_" + suffix
    if kind is Kind.COUNTER:
        out += "_total"
    return out


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda s: s.name)
def test_the_otlp_form_translates_back_to_the_prometheus_name(spec: MetricSpec) -> None:
    assert spec.otel_name.startswith("kvbroker.")
    kind = Kind.GAUGE if spec.kind is Kind.INFO else spec.kind
    assert prometheus_name_of_otlp(spec.otel_name, spec.otel_unit, kind) == spec.name


def test_examples_of_the_otlp_form() -> None:
    assert (BY_NAME["kvbroker_device_free_bytes"].otel_name, BY_NAME["kvbroker_device_free_bytes"].otel_unit) == (
        "kvbroker.device.free", "By"
    )  # fmt: skip
    assert BY_NAME["kvbroker_evictions_total"].otel_name == "kvbroker.evictions"
    assert BY_NAME["kvbroker_rpc_duration_seconds"].otel_unit == "s"
    assert BY_NAME["kvbroker_pool_fragmentation_ratio"].otel_unit == "1"


def test_the_issue_catalogue_is_covered() -> None:
    """Every metric the telemetry issue asks for has a catalogue entry."""
    wanted = {
        "kvbroker_device_capacity_bytes", "kvbroker_device_allocated_bytes", "kvbroker_device_pinned_bytes",
        "kvbroker_device_largest_free_extent_bytes", "kvbroker_device_fragmentation_ratio",
        "kvbroker_device_utilization_ratio", "kvbroker_device_caches", "kvbroker_device_segments",
        "kvbroker_pool_capacity_bytes", "kvbroker_pool_allocated_bytes", "kvbroker_pool_pinned_bytes",
        "kvbroker_pool_largest_free_extent_bytes", "kvbroker_pool_fragmentation_ratio",
        "kvbroker_pool_utilization_ratio", "kvbroker_pool_caches", "kvbroker_pool_segments",
        "kvbroker_allocations_total", "kvbroker_releases_total", "kvbroker_evictions_total",
        "kvbroker_evicted_bytes_total", "kvbroker_compactions_total", "kvbroker_compaction_moved_bytes_total",
        "kvbroker_sessions_opened_total", "kvbroker_sessions_reclaimed_total", "kvbroker_rpc_errors_total",
        "kvbroker_rpc_duration_seconds", "kvbroker_allocation_wait_seconds",
        "kvbroker_compaction_duration_seconds", "kvbroker_build_info",
    }  # fmt: skip
    assert wanted <= set(BY_NAME)
    assert {"policy", "reason"} <= set(BY_NAME["kvbroker_evictions_total"].labels)
    assert set(BY_NAME["kvbroker_rpc_duration_seconds"].labels) >= {"method", "code"}


def test_docs_table_matches_the_catalogue() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    table = doc.split("<!-- catalogue -->\n", 1)[1].split("<!-- /catalogue -->", 1)[0]
    assert table == reference_table(), "docs/metrics.md is stale: run python scripts/gen_metrics_doc.py"
