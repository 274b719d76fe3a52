"""A worker process driven one JSON line at a time, for end-to-end tests.

The child (``tests/e2e/agent.py``, ``tests/e2e/paged_worker.py``) prints a first line
(its session id), then answers each command line ``{"op": ..., ...}`` with
``{"ok": value}`` or ``{"error": kind, "message": text}``. Replies are waited for with a
deadline (``Lines``), never a fixed sleep; a child that died says so with its stderr.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.support.daemon import ROOT
from tests.support.wait import Lines

#: Seconds a child may take to answer one command (a cold one imports torch first).
REPLY_TIMEOUT_S = 60.0


class WorkerError(Exception):
    """The child's command failed: ``kind`` is the exception's class name there."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class DrivenProcess:
    """``python -m module *argv``, driven line by line: ``proc("op", **args)``."""

    def __init__(self, module: str, *argv: str, name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *argv], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.lines = Lines(self.process.stdout, name)
        self.session_id = self.reply("its session id")

    def send(self, op: str, **args) -> None:
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()

    def reply(self, what: str):
        line = self.lines.next(REPLY_TIMEOUT_S, what)
        if not line:
            self.process.kill()
            raise AssertionError(f"{self.name} died: {self.process.stderr.read()}")
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(answer["error"], answer["message"])
        return answer["ok"]

    def __call__(self, op: str, **args):
        self.send(op, **args)
        return self.reply(f"the reply to {op} {args}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
