"""The deployment files through the real tools that judge them: hadolint (Dockerfile),
kubernetes-validate --strict (every manifest), the compose specification's JSON schema
(check-jsonschema's vendored copy) and docker-compose config, promtool check/test rules,
yamllint; and the TOML the image and the ConfigMap carry, loaded by kvbroker's own
configuration parser. Each tool also rejects a broken copy, so no check passes vacuously."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvbroker.config import load_config
from tests.support.daemon import ROOT
from tests.telemetry.conftest import need_tool

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A dev-extra tool of this virtual environment (pyproject.toml [dev])."""
    path = BIN / name
    if not path.exists():
        path = shutil.which(name)
        assert path, f"{name} is missing: pip install -e '.[dev]' (scripts/test.sh does)"
    return str(path)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    done = run(tool("hadolint"), str(ROOT / "Dockerfile"))
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text((ROOT / "Dockerfile").read_text().replace("USER 10001:10001", "USER root"))
    assert run(tool("hadolint"), str(broken)).returncode != 0  # DL3002: last USER root


def test_the_dockerfile_has_what_the_deployment_relies_on() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:\S+$", text, re.M)
    assert len(re.findall(r"^FROM \$\{BASE_IMAGE\}", text, re.M)) >= 2  # multi-stage, one base
    for line in ("STOPSIGNAL SIGTERM", "USER 10001:10001", 'ENTRYPOINT ["kvbroker"]', "LABEL org.opencontainers"):
        assert line in text
    assert re.search(r"HEALTHCHECK .*\n\s+CMD \[\"kvbroker\", .*\"ping\"", text)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_validate_strict(manifest: Path) -> None:
    done = run(tool("kubernetes-validate"), "--strict", str(manifest))
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    broken = tmp_path / "daemonset.yaml"
    broken.write_text((DEPLOY / "k8s" / "daemonset.yaml").read_text().replace("hostPID: true", "hostPid: true"))
    assert run(tool("kubernetes-validate"), "--strict", str(broken)).returncode != 0


def test_the_daemonset_probes_and_grace() -> None:
    daemonset = yaml.safe_load((DEPLOY / "k8s" / "daemonset.yaml").read_text())
    pod = daemonset["spec"]["template"]["spec"]
    (broker,) = pod["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert broker[probe]["grpc"] == {"port": 50051, "service": "kvbroker.v1.CacheBroker"}
    config = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())["data"]["kvbroker.toml"]
    grace = float(re.search(r"grace_seconds = ([\d.]+)", config)[1])
    assert pod["terminationGracePeriodSeconds"] > grace
    assert pod["hostPID"] is True  # CUDA IPC across pods (README, Deploy)


@pytest.mark.parametrize("source", ["image", "configmap"])
def test_the_shipped_configurations_load(source: str, tmp_path: Path) -> None:
    """The image's TOML and the ConfigMap's load with the daemon's own parser (the token
    path pointed at a file here): 0.0.0.0 listeners with a principal."""
    if source == "image":
        text = (DEPLOY / "container" / "kvbroker.toml").read_text()
    else:
        text = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())["data"]["kvbroker.toml"]
    token = tmp_path / "token"
    token.write_text("secret\n")
    path = tmp_path / "kvbroker.toml"
    path.write_text(text.replace("/run/secrets/kvbroker-token", str(token)))
    config = load_config(path=str(path), environ={})
    assert config.listen == "0.0.0.0:50051" and config.metrics_listen == "0.0.0.0:9464"
    assert config.unix_socket == "/run/kvbroker/kvbroker.sock"
    assert config.auth.enabled and [p.name for p in config.auth.principals] == ["node"]


def test_the_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    compose = DEPLOY / "compose.yaml"
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose))
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(compose.read_text().replace("shm_size: 2gb", "shm_sizes: 2gb"))
    assert run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)).returncode != 0


def test_docker_compose_config_accepts_the_compose_file() -> None:
    done = run(need_tool("docker-compose"), "-f", str(DEPLOY / "compose.yaml"), "config", "-q")
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_and_unit_tests_the_alert_rules(tmp_path: Path) -> None:
    prometheus = DEPLOY / "prometheus"
    done = run(need_tool("promtool"), "check", "rules", "alerts.yaml", cwd=prometheus)
    assert done.returncode == 0 and "SUCCESS: 8 rules found" in done.stdout, done.stdout + done.stderr
    done = run("promtool", "test", "rules", "alerts.test.yaml", cwd=prometheus)
    assert done.returncode == 0, done.stdout + done.stderr
    # A threshold moved: the unit tests notice.
    shutil.copy(prometheus / "alerts.test.yaml", tmp_path)
    (tmp_path / "alerts.yaml").write_text((prometheus / "alerts.yaml").read_text().replace("> 0.95", "> 0.99"))
    assert run("promtool", "test", "rules", "alerts.test.yaml", cwd=tmp_path).returncode != 0


def test_every_alert_has_a_summary_a_description_and_a_severity() -> None:
    rules = [r for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
    tested = yaml.safe_load((DEPLOY / "prometheus" / "alerts.test.yaml").read_text())
    fired = {t["alertname"] for case in tested["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {r["alert"] for r in rules}


def test_promtool_checks_the_stack_prometheus_config(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yaml")]  # where compose mounts it
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = run(need_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_yamllint_passes_every_deployment_file() -> None:
    done = run(tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY))
    assert done.returncode == 0, done.stdout + done.stderr


def readme_block(title: str) -> list[str]:
    """The command lines of the first ``sh`` block under README heading ``title``."""
    text = (ROOT / "README.md").read_text()
    body = re.search(rf"^#+ {re.escape(title)}\n(.*?)```sh\n(.*?)```", text, re.M | re.S)
    assert body, f"README has no sh block under {title!r}"
    lines = body.group(2).replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines if line.strip()]


def test_the_readme_lint_commands_pass_as_written() -> None:
    """README "Check the deployment files": each command, run from the repository root
    with this environment's tools on the PATH, exits 0."""
    commands = readme_block("Check the deployment files")
    assert len(commands) == 7
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"


def test_the_readme_podman_build_is_the_tests_build() -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\nexport CONTAINERS_CONF=.*?```", text, re.S)
    assert block, "README shows how the tests build the image"
    words = " ".join(block.group(0).replace("\\\n", " ").split())
    for part in ("--format docker", "--network host", "BASE_IMAGE=localhost/debian-py:bookworm",
                 "deploy/podman/pip.conf:/etc/pip.conf:ro", "EXTRA_FIND_LINKS=/opt/wheels",
                 "-t localhost/kvbroker:test"):  # fmt: skip
        assert part in words, part
    assert "scripts/container_base.sh" in words and "deploy/podman/containers.conf" in words
