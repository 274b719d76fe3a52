"""The kvbroker image, built once per test session from the repository's Dockerfile, and
the node-side directories a broker container shares with workers outside it."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .containers import build_image, need_podman

#: The image's user (Dockerfile: USER 10001): what it creates must be usable by workers.
BROKER_UID = 10001


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> str:
    need_podman()
    if os.geteuid() != 0:
        pytest.skip("the container tests run rootful podman (CI runs as root)")
    return build_image(tmp_path_factory.mktemp("image"))


@dataclass
class Node:
    """What a node gives a broker container: the socket directory (mounted at
    /run/kvbroker), a shared-memory directory (mounted at the same path, so a handle's
    path means the same file inside and outside), and the token secret."""

    socket_dir: Path
    shm_dir: Path
    token_file: Path

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def target(self) -> str:
        return f"unix://{self.socket_dir / 'kvbroker.sock'}"

    def mounts(self, *, token: bool = True) -> list[str]:
        secret = ["-v", f"{self.token_file}:/run/secrets/kvbroker-token:ro"] if token else []
        return ["-v", f"{self.socket_dir}:/run/kvbroker", "-v", f"{self.shm_dir}:{self.shm_dir}", *secret,
                "-e", f"KVBROKER_SHM_DIR={self.shm_dir}"]  # fmt: skip


def make_node(tmp_path: Path) -> Iterator[Node]:
    socket_dir = tmp_path / "run"
    socket_dir.mkdir()
    os.chown(socket_dir, BROKER_UID, BROKER_UID)
    shm_dir = Path(tempfile.mkdtemp(prefix="kvbroker-test-", dir="/dev/shm"))
    os.chown(shm_dir, BROKER_UID, BROKER_UID)
    token_file = tmp_path / "kvbroker-token"
    token_file.write_text(secrets.token_urlsafe(24) + "\n")
    token_file.chmod(0o644)  # the broker reads it as uid 10001
    try:
        yield Node(socket_dir, shm_dir, token_file)
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


@pytest.fixture
def node(tmp_path) -> Iterator[Node]:
    yield from make_node(tmp_path)


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory) -> Iterator[Node]:
    """One node for a module's tests that share one broker container."""
    yield from make_node(tmp_path_factory.mktemp("node"))
