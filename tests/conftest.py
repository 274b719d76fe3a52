"""Suite-wide settings, and the daemon logs of failing tests.

Under CI (the ``CI`` variable set, as ``.ci/run`` has it), Hypothesis runs derandomized:
the same examples every run, so a landing is never decided by the luck of one random
draw. Local runs stay random and keep exploring new examples.
"""

from __future__ import annotations

import os
import sys

# Tests start daemons and workers (subprocess.Popen with a preexec_fn: fork, then exec)
# while this process's clients have calls in flight (a Watch waiting for a restarted
# daemon). gRPC's fork handlers then restart its poller in the child between fork and
# exec, where Popen has closed its epoll fd, and the child aborts ("epoll_wait error: Bad
# file descriptor", grpc/grpc#43055). Nothing here uses gRPC across a fork: turn them off
# before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# -- daemons in failure reports ------------------------------------------------------
#
# tests/support/daemon.py starts real daemons whose logs are files. When a test fails,
# the tail of the log of every daemon it may have used (started during the test, or
# still running, such as a module's shared daemon) is added to its report, so the
# daemon's side of the failure is on screen without digging for the file.

_FIRST_DAEMON = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    daemons = sys.modules.get("tests.support.daemon")
    item.stash[_FIRST_DAEMON] = len(daemons.STARTED) if daemons else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    daemons = sys.modules.get("tests.support.daemon")
    if not report.failed or daemons is None:
        return
    first = item.stash.get(_FIRST_DAEMON, 0)
    for index, daemon in enumerate(daemons.STARTED):
        if index >= first or daemon.alive:
            report.sections.append((f"{daemon.describe()}: last lines", daemon.log_tail()))
