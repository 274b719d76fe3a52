"""``kvbroker top`` on a real terminal: tmux gives it one (a private tmux server per
test); the screen is redrawn in place, and ``q`` or Ctrl-C quits with exit code 0 and
the terminal restored. Skipped where tmux is not installed (the non-terminal mode is
tested in tests/cli/test_commands.py everywhere)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, child_env, daemon_fixture
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

daemon = daemon_fixture(scope="module", metrics=True, host_capacity="64MiB")


class Terminal:
    """A command in a detached tmux pane of 140x40 on a private server."""

    def __init__(self, command: list[str], status_file: Path) -> None:
        self.server = f"kvb-test-{uuid.uuid4().hex[:8]}"
        env = child_env(None)
        exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("PYTHONPATH", "PATH") if k in env)
        script = f"cd {shlex.quote(str(ROOT))} && env {exports} {shlex.join(command)}; echo $? > {status_file}"
        self.tmux("new-session", "-d", "-x", "140", "-y", "40", "-s", "top", script)

    def tmux(self, *argv: str) -> str:
        done = subprocess.run(["tmux", "-L", self.server, *argv], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_top_redraws_in_place_and_quits_on_q_or_ctrl_c(daemon, tmp_path, key):
    status = tmp_path / "status"
    terminal = Terminal([sys.executable, "-m", "kvbroker", "--target", daemon.target, "top", "--interval", "0.3"],
                        status)  # fmt: skip
    try:
        first = wait_until(lambda: "pool default" in (s := terminal.screen()) and s, 30, "top drew its screen")
        assert "(q quits)" in first and first.splitlines()[0].startswith("kvbroker ")
        redrawn = wait_until(lambda: "rates from the next refresh" not in (s := terminal.screen()) and s, 30,
                             "top redrew the screen with rates")  # fmt: skip
        assert redrawn.count("SCOPE") == 1, "redrawn in place, not appended"
        assert any(line.startswith("Stats") and "/s" in line for line in redrawn.splitlines()), redrawn
        terminal.tmux("send-keys", "-t", "top", key)
        code = wait_until(lambda: status.exists() and status.read_text().strip(), 30, f"top exited on {key}")
        assert code == "0"
    finally:
        terminal.close()
