"""deploy/compose.yaml brought up as far as these machines allow, end to end.

No image registry is reachable here, so the stack's Prometheus, OpenTelemetry Collector
and Grafana images cannot be pulled, and Debian's podman-compose (1.0.3) ignores
``ipc:``, which the worker needs to share the broker's /dev/shm. So the test resolves the
file with ``docker-compose config`` and runs its two kvbroker services with podman
exactly as that resolved file says (image, environment, secrets, the socket volume,
``ipc``, ``shm_size``, entrypoint and command), ``depends_on: service_healthy`` as a wait
for the image's HEALTHCHECK; and runs Prometheus from its Debian package with the
stack's own prometheus.yml and alert rules, its target pointed at the broker's published
metrics port. The worker must allocate, write and read its cache through the shared
socket and shm; Prometheus must scrape the broker, see that allocation, and load the
rules healthy; the broker must stop cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.daemon import ROOT, free_port
from tests.support.wait import wait_until
from tests.telemetry.conftest import need_tool

from .containers import IMAGE, podman

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

COMPOSE = ROOT / "deploy" / "compose.yaml"
#: The collector is not running here: the broker's OTLP exporter is left unconfigured.
NOT_HERE = ("OTEL_EXPORTER_OTLP_ENDPOINT",)


def resolved(token_file: Path) -> dict:
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KVBROKER_TOKEN_FILE": str(token_file), "KVBROKER_IMAGE": IMAGE})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def run_args(stack: dict, name: str, project: str) -> list[str]:
    """``podman run`` options for service ``name`` as the resolved compose file gives it."""
    service = stack["services"][name]
    args = ["--name", f"{project}-{name}"]
    for key, value in service.get("environment", {}).items():
        if key not in NOT_HERE:
            args += ["-e", f"{key}={value}"]
    for secret in service.get("secrets", []):
        source = secret["source"]
        target = secret.get("target", source)
        args += ["-v", f"{stack['secrets'][source]['file']}:/run/secrets/{target}:ro"]
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        assert source in stack["volumes"], f"{name}: only the stack's named volumes here, not {source}"
        args += ["-v", ":".join([f"{project}-{source}", target, *mode])]
    ipc = service.get("ipc")
    if ipc:
        args += ["--ipc", f"container:{project}-{ipc.removeprefix('service:')}" if ipc.startswith("service:") else ipc]
    if "shm_size" in service:
        args += ["--shm-size", service["shm_size"]]
    if "stop_signal" in service:
        args += ["--stop-signal", service["stop_signal"]]
    if "entrypoint" in service:
        args += ["--entrypoint", json.dumps(service["entrypoint"])]
    return args


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def test_the_stack_serves_a_worker_and_prometheus_scrapes_it(image: str, tmp_path: Path) -> None:
    token = tmp_path / "kvbroker-token"
    token.write_text("compose-test-token\n")
    token.chmod(0o644)
    stack = resolved(token)
    assert stack["services"]["kvbroker"]["image"] == IMAGE == stack["services"]["worker"]["image"]
    project = f"kvbroker-compose-{os.getpid()}"
    for volume in stack["volumes"]:
        podman("volume", "create", f"{project}-{volume}")
    broker = f"{project}-kvbroker"
    prometheus = None
    try:
        podman("run", "-d", *run_args(stack, "kvbroker", project), "-p", "127.0.0.1::9464", image,
               *stack["services"]["kvbroker"].get("command", []))  # fmt: skip
        # depends_on: {kvbroker: {condition: service_healthy}}: the image's HEALTHCHECK.
        assert stack["services"]["worker"]["depends_on"]["kvbroker"]["condition"] == "service_healthy"

        def healthy() -> bool:
            state = podman("inspect", broker, "--format", "{{.State.Status}}").stdout.strip()
            assert state == "running", podman("logs", broker, check=False).stderr
            return podman("healthcheck", "run", broker, check=False).returncode == 0

        wait_until(healthy, 90, "the broker's HEALTHCHECK passes")
        worker = podman("run", "--rm", *run_args(stack, "worker", project), image,
                        *stack["services"]["worker"]["command"], timeout=300, check=False)  # fmt: skip
        assert worker.returncode == 0, worker.stdout + worker.stderr + podman("logs", broker, check=False).stderr
        assert "read 67108864 bytes of cache" in worker.stdout and "as written" in worker.stdout

        # Prometheus (Debian's) with the stack's configuration and rules.
        metrics_port = int(podman("port", broker, "9464").stdout.strip().rsplit(":", 1)[1])
        config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["kvbroker:9464"]
        config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "alerts.yaml")]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        api = f"http://127.0.0.1:{port}/api/v1"
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
        prometheus = subprocess.Popen(
            [need_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def allocated() -> float:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            query = urllib.parse.quote('kvbroker_allocations_total{job="kvbroker", pool="default", outcome="ok"}')
            try:
                result = get(f"{api}/query?query={query}")["data"]["result"]
            except OSError:
                return 0
            return float(result[0]["value"][1]) if result else 0

        assert wait_until(allocated, 60, "Prometheus sees the worker's allocation") == 1
        assert [t["health"] for t in get(f"{api}/targets")["data"]["activeTargets"]] == ["up"]
        rules = wait_until(lambda: [r for g in get(f"{api}/rules")["data"]["groups"] for r in g["rules"]
                                    if r.get("lastEvaluation", "0").startswith("20")],
                           30, "Prometheus evaluated the stack's alert rules")  # fmt: skip
        assert rules and all(r["health"] == "ok" for r in rules)

        podman("stop", "-t", "30", broker, timeout=60)
        status = podman("inspect", broker, "--format", "{{.State.ExitCode}}").stdout.strip()
        logs = podman("logs", broker, check=False).stderr
        assert status == "0" and "stopped; all segments freed" in logs, logs
    finally:
        if prometheus is not None:
            prometheus.send_signal(signal.SIGTERM)
            prometheus.wait(30)
            log.close()
        podman("rm", "-f", "-t", "0", broker, check=False)
        for volume in stack["volumes"]:
            podman("volume", "rm", "-f", f"{project}-{volume}", check=False)
