"""A start that fails says why in the daemon's own words, once, with the right exit code:
2 for the configuration (every problem listed, each under its key), 1 for an address that
cannot be bound; and nothing of gRPC's C core (its ``E1201 ... add_port.cc`` line used to
follow the daemon's message, issue 10 defect 7). Real daemons: one started by
tests/support/daemon.py holds the port, and ``kvbroker serve`` is run as an operator runs
it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.daemon import ROOT, child_env, running_daemon

#: How gRPC's C core prefixes its log lines: severity letter, MMDD, time, thread id.
CORE_LOG_LINE = re.compile(r"^[EWID]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)
#: A start that should fail at once; far more than it takes (a cold import of torch).
FAIL_TIMEOUT_S = 120


def serve(*args: str, config: str | None = None, tmp_path=None) -> subprocess.CompletedProcess[str]:
    """``python -m kvbroker serve`` on the host device without metrics, plus ``args``;
    waits for it to exit (a daemon that starts instead fails the test at the timeout)."""
    flags = ["--devices", "host", "--metrics-listen", ""]
    if config is not None:
        path = tmp_path / "kvbroker.toml"
        path.write_text(config)
        flags += ["--config", str(path)]
    return subprocess.run(
        [sys.executable, "-m", "kvbroker", "serve", *flags, *args], cwd=ROOT, env=child_env(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=FAIL_TIMEOUT_S,
    )  # fmt: skip


def assert_no_grpc_core_output(stderr: str) -> None:
    assert not CORE_LOG_LINE.search(stderr), stderr
    assert "add_port.cc" not in stderr and "GRPC_VERBOSITY" not in stderr, stderr


def test_a_port_in_use_fails_with_the_daemons_line_alone(tmp_path):
    with running_daemon(tmp_path / "first") as first:
        second = serve("--listen", first.address, "--unix-socket", str(tmp_path / "second.sock"))
    assert second.returncode == 1, second.stderr
    assert f"kvbroker: cannot start: cannot listen on {first.address}: address already in use" in second.stderr
    assert_no_grpc_core_output(second.stderr)


def test_a_unix_socket_in_a_missing_directory_fails_with_the_daemons_line_alone(tmp_path):
    path = tmp_path / "missing" / "kvbroker.sock"
    result = serve("--listen", "", "--unix-socket", str(path))
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on unix socket {path}: no such file or directory" in result.stderr
    assert_no_grpc_core_output(result.stderr)


def test_an_out_of_range_port_is_refused_not_wrapped(tmp_path):
    """127.0.0.1:99999 used to serve on port 34463 (99999 - 65536)."""
    result = serve("--listen", "127.0.0.1:99999", "--unix-socket", str(tmp_path / "k.sock"))
    assert result.returncode == 2, result.stderr
    assert "--listen: port 99999 is out of range: ports are 0 to 65535" in result.stderr
    assert not (tmp_path / "k.sock").exists()


@pytest.mark.parametrize("where", ["file", "flags"])
def test_every_configuration_problem_is_listed_at_once(tmp_path, where):
    if where == "file":
        config = (
            "[server]\ngrace_seconds = -1\n[sessions]\nlease_seconds = 0\n"
            "[[pools]]\nname = 'b'\nmin_bytes = '2Gi'\nmax_bytes = '1Gi'\ngc_threshold = 7\n"
        )
        result = serve("--unix-socket", str(tmp_path / "k.sock"), config=config, tmp_path=tmp_path)
        keys = ["server.grace_seconds", "sessions.lease_seconds", "pools[0].max_bytes", "pools[0].gc_threshold"]
    else:
        result = serve("--listen", "127.0.0.1:65536", "--grace-seconds", "-1", "--host-capacity", "1.5",
                       "--unix-socket", str(tmp_path / "k.sock"))  # fmt: skip
        keys = ["--host-capacity", "--grace-seconds", "--listen"]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"kvbroker: {len(keys)} configuration errors:", result.stderr
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == sorted(keys), result.stderr
    assert "pools.b." not in result.stderr


def test_a_paged_arena_that_does_not_fit_stops_the_start_under_its_key(tmp_path):
    config = """
[devices]
host_capacity = "8MiB"
[[pools]]
name = "default"
[[pools]]
name = "llama"
[pools.kv]
num_layers = 4
num_kv_heads = 4
head_dim = 64
max_tokens = 4096
"""  # a 16 MiB arena on an 8 MiB device
    done = serve("--listen", "", "--unix-socket", str(tmp_path / "s.sock"), config=config, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "configuration error: pools[1].kv: the arena of paged pool 'llama' cannot be allocated" in done.stderr
    assert_no_grpc_core_output(done.stderr)
