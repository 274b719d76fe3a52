"""The checkpoint store on real files: a crash between any two durable steps (a real
SIGKILL of a real writer process) never leaves a loadable torn generation; a torn one is
rejected whole; a full disk (the kernel's ENOSPC, from /dev/full) is its own error.

``load`` below picks a generation exactly as the daemon's restore does
(``kvbroker/engine/persistence.py``: ``Store.candidates``, ``Store.open``, then every
file through ``read_cache_file``), with a sink that collects the bytes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kvbroker.persistence import CacheMeta, CorruptFile, CorruptGeneration, DiskFull, Store
from kvbroker.persistence.cachefile import read_cache_file
from tests.support.daemon import ROOT, child_env
from tests.support.tinyfs import tiny_filesystem

NBYTES = 3 * 65536 + 5
STEPS = ("file-written", "file-renamed", "manifest-written", "directory-synced", "current-written", "current-renamed")

WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from kvbroker.persistence import CacheMeta, Store

    directory, crash_at, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def on_step(name):
        if name == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store = Store(directory, on_step=on_step)
    rng = np.random.default_rng(seed)
    writer = store.begin(3 * {nbytes}, 3)
    for i in range(3):
        data = rng.integers(0, 256, {nbytes}, dtype=np.uint8)
        writer.write(CacheMeta(f"c{{i}}", "kept", "m", "uint8", ({nbytes},), True, i, {nbytes}), data)
    print(writer.publish())
    """
).format(nbytes=NBYTES)


def expected(seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"c{i}": rng.integers(0, 256, NBYTES, dtype=np.uint8).tobytes() for i in range(3)}


def write_generation(directory: Path, seed: int, crash_at: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WRITER, str(directory), crash_at, str(seed)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def load(directory: Path) -> tuple[int, dict[str, bytes]] | None:
    """The generation the daemon would restore, and its caches' bytes (None: none)."""
    store = Store(str(directory))
    for number, digest in store.candidates():
        try:
            generation = store.open(number, digest)
            caches = {}
            for entry in generation.entries:
                out = bytearray(entry.meta.nbytes)

                def sink(offset: int, chunk: np.ndarray, out=out) -> None:
                    out[offset : offset + chunk.nbytes] = chunk.tobytes()

                meta = read_cache_file(os.path.join(generation.path, entry.file), entry.size, entry.digest, sink)
                assert meta == entry.meta
                caches[meta.cache_id] = bytes(out)
            return number, caches
        except (CorruptGeneration, CorruptFile):
            continue
    return None


@pytest.fixture(scope="module")
def first_generation(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base") / "checkpoints"
    done = write_generation(directory, seed=1)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
    return directory


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_loads_a_whole_generation(first_generation, tmp_path, step):
    directory = tmp_path / "checkpoints"
    shutil.copytree(first_generation, directory)
    crashed = write_generation(directory, seed=2, crash_at=step)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    committed = step == "current-renamed"  # CURRENT's rename is the commit point
    assert load(directory) == ((2, expected(2)) if committed else (1, expected(1)))
    # The next checkpoint clears what the crash left and publishes.
    done = write_generation(directory, seed=3)
    assert done.returncode == 0, done.stderr
    assert load(directory) == (3, expected(3))
    assert sorted(p.name for p in directory.glob("gen-*")) == (
        ["gen-000002", "gen-000003"] if committed else ["gen-000001", "gen-000003"]
    )


@pytest.fixture()
def two_generations(first_generation, tmp_path) -> Path:
    directory = tmp_path / "checkpoints"
    shutil.copytree(first_generation, directory)
    assert write_generation(directory, seed=2).returncode == 0
    assert load(directory) == (2, expected(2))
    return directory


def test_a_file_missing_from_disk_rejects_its_generation(two_generations):
    next(two_generations.glob("gen-000002/*.safetensors")).unlink()
    assert load(two_generations) == (1, expected(1))


def test_an_edited_manifest_rejects_its_generation(two_generations):
    manifest = two_generations / "gen-000002" / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace('"priority": 2', '"priority": 9'))
    assert load(two_generations) == (1, expected(1))


def test_a_file_of_another_cache_is_not_restored_into_this_one(two_generations):
    files = sorted(two_generations.glob("gen-000002/*.safetensors"))
    a, b = files[0].read_bytes(), files[1].read_bytes()
    files[0].write_bytes(b)
    files[1].write_bytes(a)
    assert load(two_generations) == (1, expected(1))


@pytest.fixture()
def tiny(tmp_path):
    with tiny_filesystem(tmp_path) as mountpoint:
        if mountpoint is None:
            pytest.skip("this machine does not let a test mount a small tmpfs")
        yield mountpoint


def test_a_full_disk_is_disk_full_and_leaves_nothing(tiny):
    directory = tiny / "checkpoints"
    store = Store(str(directory))
    writer = store.begin(1 << 20, 1)
    meta = CacheMeta("c0", "kept", "", "uint8", (1 << 20,), True, 0, 1 << 20)
    with pytest.raises(DiskFull, match="full"):
        writer.write(meta, np.zeros(1 << 20, dtype=np.uint8))
    writer.abandon()
    assert not list(directory.glob("gen-*")), "nothing left behind"
    assert load(directory) is None
