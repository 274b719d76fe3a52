"""Every PromQL expression of the alert rules and the dashboard (its panels and its
variables' queries), run against a real Prometheus (Debian's package, as in
tests/telemetry) that scrapes a real daemon after the telemetry tests' known operations
and loads the alert rules: each query succeeds, each dashboard panel query returns
series, each rule evaluates with health "ok", and every metric named exists in the
catalogue (kvbroker/telemetry/catalogue.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from kvbroker.telemetry.catalogue import BY_NAME, Kind
from kvbroker.v1 import broker_pb2_grpc
from tests.support.daemon import ROOT, free_port, running_daemon
from tests.support.wait import wait_until
from tests.telemetry.conftest import CONFIG, need_tool, run_operations

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kvbroker.json"
#: What Grafana puts for the dashboard's variables: every instance, device and pool; a
#: rate window that holds several of the test's 1 s scrapes.
GRAFANA_VARIABLES = {"instance": ".*", "device": ".*", "pool": ".*", "__rate_interval": "20s", "datasource": ""}
METRIC = re.compile(r"\b(kvbroker_[a-z0-9_]+)\b")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\)$")


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def variable_queries() -> list[tuple[str, str]]:
    return [(v["name"], v["definition"]) for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def substitute(expr: str) -> str:
    """The expression as Grafana sends it: ``$name`` and ``${name}`` replaced."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)


def metric_names(expr: str) -> set[str]:
    """The catalogue names an expression reads (a histogram's _bucket/_count/_sum series
    are its own name)."""
    names = set()
    for name in METRIC.findall(expr):
        for suffix in ("_bucket", "_count", "_sum"):
            base = name.removesuffix(suffix)
            if base != name and base in BY_NAME and BY_NAME[base].kind is Kind.HISTOGRAM:
                name = base
        names.add(name)
    return names


def every_expression() -> list[tuple[str, str]]:
    return ([(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + panel_queries()
            + [(f"variable {n}", q) for n, q in variable_queries()])  # fmt: skip


@pytest.mark.parametrize(("where", "expr"), every_expression())
def test_every_metric_named_is_in_the_catalogue(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names or "up{" in expr, f"{where}: no kvbroker metric in {expr!r}"
    assert not names - set(BY_NAME), f"{where}: not in the catalogue: {sorted(names - set(BY_NAME))}"


@dataclass
class Prometheus:
    api: str

    def get(self, path: str, **params: str | list[str]) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.api}{path}?{query}", timeout=10) as reply:
            return json.loads(reply.read())

    def query(self, expr: str) -> dict:
        try:
            return self.get("/query", query=expr)
        except urllib.error.HTTPError as err:  # 400/422: a bad expression, with Prometheus's reason
            return json.loads(err.read())


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[Prometheus]:
    """A daemon after the known operations, and a Prometheus scraping it every second
    with the alert rules loaded and evaluated every second."""
    binary = need_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    with running_daemon(tmp / "daemon", config=CONFIG, metrics=True) as daemon:
        with grpc.insecure_channel(daemon.target) as channel:
            run_operations(broker_pb2_grpc.CacheBrokerStub(channel))
        target = urllib.parse.urlparse(daemon.metrics_url).netloc
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "kvbroker", "static_configs": [{"targets": [target]}]}],
        }))  # fmt: skip
        port = free_port()
        with open(tmp / "prometheus.log", "wb") as log:
            process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                server = Prometheus(f"http://127.0.0.1:{port}/api/v1")

                def scrapes() -> float:
                    assert process.poll() is None, (tmp / "prometheus.log").read_text()
                    try:
                        result = server.get("/query", query='count_over_time(up{job="kvbroker"}[1m])')["data"]["result"]
                    except OSError:  # not listening yet
                        return 0
                    return float(result[0]["value"][1]) if result else 0

                # Enough scrapes that every rate window (20 s) holds several samples.
                wait_until(lambda: scrapes() >= 5, 60, "Prometheus has scraped the daemon 5 times", interval=0.5)
                yield server
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)


@pytest.mark.parametrize(("where", "expr"), panel_queries())
def test_every_dashboard_query_returns_series(prometheus: Prometheus, where: str, expr: str) -> None:
    answer = prometheus.query(substitute(expr))
    assert answer["status"] == "success", f"{where}: {answer}"
    assert answer["data"]["result"], f"{where}: no series for {substitute(expr)}"


@pytest.mark.parametrize(("name", "query"), variable_queries())
def test_every_dashboard_variable_lists_values(prometheus: Prometheus, name: str, query: str) -> None:
    parsed = LABEL_VALUES.match(query)
    assert parsed, f"variable {name}: expected label_values(...), got {query!r}"
    params = {"match[]": [substitute(parsed["match"])]} if parsed["match"] else {}
    answer = prometheus.get(f"/label/{parsed['label']}/values", **params)
    assert answer["status"] == "success" and answer["data"], f"variable {name}: {answer}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_expression_runs(prometheus: Prometheus, rule: dict) -> None:
    answer = prometheus.query(rule["expr"])
    assert answer["status"] == "success", f"{rule['alert']}: {answer}"
    assert answer["data"]["resultType"] == "vector"
    for series in answer["data"]["result"]:  # what the annotations' templates read
        wanted = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
        assert wanted <= set(series["metric"]), f"{rule['alert']}: {series['metric']} lacks {wanted}"


def test_pool_near_quota_holds_for_the_full_pool_only(prometheus: Prometheus) -> None:
    """The operations leave pool "small" at its quota (two pinned 8 MiB caches of 16 MiB)
    and "default" empty: the rule's condition picks out exactly the full one."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "KvbrokerPoolNearQuota"]
    result = prometheus.query(rule["expr"])["data"]["result"]
    assert [s["metric"]["pool"] for s in result] == ["small"]


def test_prometheus_loads_and_evaluates_every_rule(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict]:
        rules = [r for g in prometheus.get("/rules")["data"]["groups"] for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "0001").startswith("20") for r in rules) else []

    rules = wait_until(evaluated, 30, "Prometheus has evaluated every alert rule")
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in alert_rules())
    assert [r for r in rules if r["health"] != "ok"] == []
