"""Real containers for the deployment tests: podman (the CI machines have no Docker
daemon and no reachable image registry), run with runc as deploy/podman/containers.conf
says, on a base image made from Debian packages (scripts/container_base.sh).

The image is the repository's Dockerfile, built as a user builds it (``docker build -t
kvbroker .``) with four local differences, all build-time only: ``BASE_IMAGE`` is the
local Debian base, this machine's wheel directory (the CPU torch) is mounted and named
by ``EXTRA_FIND_LINKS``, and its CA bundle and deploy/podman/pip.conf (which names it)
are mounted so pip trusts this network's proxy; README "Check the deployment files" shows
the same command. Podman keeps the layers between runs, so after the
first build only the layers after a changed ``COPY`` are rebuilt.

Cost (measured on the loaded 2-core machine): the first build on a machine about 5
minutes (the base image 1.5, the image 3.5); a rebuild after a change to kvbroker/ about a
minute, with nothing changed 28 seconds; each container serves within about 6 seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import ROOT

CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
BASE_IMAGE = os.environ.get("KVBROKER_BASE_IMAGE", "localhost/debian-py:bookworm")
IMAGE = "localhost/kvbroker:test"
WHEELS = "/opt/wheels"  # the CPU torch wheel on these machines (pip config list)
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_names = itertools.count()


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def need_podman() -> str:
    """podman's path; skips (with the reason) where no container runtime is installed,
    which scripts/test.sh does as root."""
    path = shutil.which("podman")
    if path is None:
        pytest.skip("no container runtime: podman is not installed (scripts/test.sh installs it with "
                    "apt-get when run as root or with sudo)")  # fmt: skip
    return path


def podman(*args: str, timeout: float = 120, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env(),
                          input=input)  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def build_image(workdir: Path) -> str:
    """Build the Dockerfile into ``IMAGE`` (the base image first when absent)."""
    need_podman()
    base = subprocess.run(["bash", str(ROOT / "scripts" / "container_base.sh")], capture_output=True, text=True,
                          timeout=900, env={**podman_env(), "KVBROKER_BASE_IMAGE": BASE_IMAGE})  # fmt: skip
    assert base.returncode == 0, f"building the base image failed:\n{base.stdout}\n{base.stderr}"
    pip_conf = ROOT / "deploy" / "podman" / "pip.conf"
    args = ["build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]  # fmt: skip
    if os.path.isdir(WHEELS):
        args += ["--build-arg", f"EXTRA_FIND_LINKS={WHEELS}", "-v", f"{WHEELS}:{WHEELS}:ro"]
    log = workdir / "build.log"
    previous = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    with open(log, "w") as out:
        done = subprocess.run(["podman", *args, "-t", IMAGE, str(ROOT)], stdout=out, stderr=subprocess.STDOUT,
                              timeout=1200, env=podman_env())  # fmt: skip
    assert done.returncode == 0, "podman build failed:\n" + "\n".join(log.read_text().splitlines()[-40:])
    # The store persists between CI runs: drop the image this build replaced (its venv
    # layer is most of a GB), keeping the build stages' layers that are the cache.
    if previous and podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip() != previous:
        podman("rmi", previous, check=False)
    return IMAGE


@dataclass
class Container:
    name: str

    def port(self, private: int) -> int:
        """The host port published for ``private`` (``-p 127.0.0.1::PORT``)."""
        out = podman("port", self.name, str(private)).stdout.strip().splitlines()[0]
        return int(out.rsplit(":", 1)[1])

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def state(self) -> tuple[str, int]:
        out = podman("inspect", self.name, "--format", "{{.State.Status}} {{.State.ExitCode}}").stdout.split()
        return out[0], int(out[1])

    def exec(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        flags = [item for k, v in (env or {}).items() for item in ("-e", f"{k}={v}")]
        return podman("exec", *flags, self.name, *args, timeout=timeout, check=False)


@contextlib.contextmanager
def running_container(image: str, *args: str, command: Sequence[str] = ()) -> Iterator[Container]:
    """``podman run -d`` with ``args``; the container is removed (forcibly) afterwards."""
    name = f"kvbroker-test-{os.getpid()}-{next(_names)}"
    podman("run", "-d", "--name", name, *args, image, *command)
    try:
        yield Container(name)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
