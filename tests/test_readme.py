"""The README's operator commands work as written after its set-up (issue 10, defect 6:
``kvbroker`` and ``grpcurl`` were not on the PATH, and ``kvbroker ls --pool vista``
failed on the default configuration, which has no such pool).

The commands are read from the README itself, so the README and these tests cannot
drift apart: each ``kvbroker`` and ``grpcurl`` line of "Operate it" that needs no remote
broker or credentials runs against a real daemon started with the default pools."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, child_env, running_daemon

README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(VENV_BIN)) or shutil.which("grpcurl")
#: The address the README's commands use: the daemon's default.
DEFAULT_ADDRESS = "127.0.0.1:50051"


def section(title: str) -> str:
    """The README's text from the heading ``title`` to the next heading of its level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^\1 )", README, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section {title!r}"
    return match.group(2)


def shell_lines(text: str) -> list[str]:
    """The commands of the ``sh`` blocks in ``text``, continuation lines joined."""
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    lines = [re.sub(r"(^|\s+)#.*$", "", line).strip() for line in lines]  # comments
    return [line for line in lines if line]


def local_commands() -> list[list[str]]:
    """The "Operate it" commands that a local default daemon can answer: no remote
    broker, no credential files."""
    commands = []
    for line in shell_lines(section("Operate it").split("### ")[0]):
        words = shlex.split(line, comments=True)
        if words and words[0] in ("kvbroker", "grpcurl") and not any(
            w.startswith(("10.", "--tls", "-cert", "-cacert", "-key", "-H")) or ".example" in w for w in words
        ):
            commands.append(words)
    return commands


def test_the_set_up_puts_the_commands_on_the_path():
    setup = section("Set up")
    assert ". .venv/bin/activate" in shell_lines(setup), "the set-up says how to reach .venv's commands"
    assert (VENV_BIN / "activate").exists(), "the scripts make a virtual environment with an activate script"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"
    found = subprocess.run(
        ["bash", "-c", f". {shlex.quote(str(VENV_BIN / 'activate'))} && command -v kvbroker && command -v python"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(VENV_BIN / "kvbroker"), str(VENV_BIN / "python")]


def test_the_operate_commands_name_only_what_the_default_configuration_has():
    for words in local_commands():
        for flag, value in zip(words, words[1:]):
            if flag == "--pool":
                assert value == "default", f"{shlex.join(words)}: the default configuration has one pool, 'default'"


def test_the_operate_commands_run_against_a_daemon_with_the_default_pools(tmp_path):
    commands = local_commands()
    assert {w[1] for w in commands if w[0] == "kvbroker"} >= {"stats", "ls", "defrag"}
    with running_daemon(tmp_path, host_capacity="256MiB") as daemon:
        env = child_env({"KVBROKER_TARGET": daemon.target})
        for words in commands:
            if words[0] == "grpcurl":
                if GRPCURL is None:
                    continue  # installed by the dev extra (scripts/test.sh)
                argv = [GRPCURL, *(daemon.address if w == DEFAULT_ADDRESS else w for w in words[1:])]
            else:
                argv = [sys.executable, "-m", "kvbroker", *words[1:]]
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{shlex.join(words)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("script", ["serve.sh", "test.sh"])
def test_the_two_set_up_commands_exist_and_install_into_dot_venv(script):
    """The set-up's two commands are the scripts, and both make .venv (bootstrap.sh)."""
    assert f"./scripts/{script}" in shell_lines(section("Set up"))
    text = (ROOT / "scripts" / script).read_text()
    assert "scripts/bootstrap.sh" in text and os.access(ROOT / "scripts" / script, os.X_OK)
    assert '-m venv .venv' in (ROOT / "scripts" / "bootstrap.sh").read_text()
