"""Daemons of the transformers tests: one serving the host device for the module, and,
for the ``cuda`` twins, one serving the GPU (skipped without one). ``broker`` gives the
one a test's ``device`` parameter names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.support.daemon import Daemon, daemon_fixture, running_daemon

CONFIG = """
[devices]
host_capacity = "64MiB"

[[pools]]
name = "default"
segment_bytes = "16MiB"
block_bytes = "64KiB"
"""

#: A test's ``device`` parameter: the host always, CUDA marked and skipped without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]

host_daemon = daemon_fixture(config=CONFIG, scope="module")


@pytest.fixture(scope="module")
def cuda_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(
        tmp_path_factory.mktemp("cuda-daemon"), config=CONFIG, devices="cuda",
        env={"KVBROKER_CUDA_MEMORY_FRACTION": "0.05"},
    ) as daemon:  # fmt: skip
        yield daemon


@pytest.fixture
def broker(request: pytest.FixtureRequest, device: str) -> Daemon:
    """The daemon serving ``device`` (started once per module)."""
    return request.getfixturevalue("cuda_daemon" if device == "cuda" else "host_daemon")


@pytest.fixture
def device() -> str:
    """The device of a test that is not parametrized over ``DEVICES``."""
    return "cpu"
