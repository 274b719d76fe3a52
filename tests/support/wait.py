"""Waiting for conditions, never for time.

A test that sleeps and then looks is a race: on a loaded machine (two cores shared by
several test runs) the thing it waits for may take longer than the sleep, and on a quiet
one the sleep is wasted. These helpers poll a condition against a deadline instead, and
fail with a sentence that says what did not happen:

- ``wait_until(predicate, timeout, what)``: poll until ``predicate()`` is truthy; return
  its value. The deadline is an upper bound, never a duration the test pays.
- ``holds_for(predicate, seconds, what)``: the opposite claim, "this does not change for
  a while" (a waiting allocation stays waiting, a hung client keeps its memory within its
  lease). Such a claim can only be observed over a window; the window is explicit here
  and the predicate is checked throughout it, so a violation fails at once and names
  itself instead of being noticed by a later assertion.
- ``Lines``: the stdout of a child process as a stream of lines, each read with a
  deadline, so a hung child fails the test with what it printed instead of hanging it.

The polling interval is the only sleep, and it is not a wait for anything.
"""

from __future__ import annotations

import queue
import threading
import asyncio
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

T = TypeVar("T")

#: Between two polls. Short, so a condition is seen soon after it holds; the predicates
#: here are cheap (a Stats RPC, a dictionary look-up, a process poll).
POLL_INTERVAL_S = 0.01


class WaitTimeout(AssertionError):
    """A condition was not met within its deadline (an ``AssertionError``, so pytest shows
    it as a failed expectation, with the description)."""


def wait_until(
    predicate: Callable[[], T], timeout: float, what: str, *, interval: float = POLL_INTERVAL_S,
    detail: Callable[[], object] | None = None,
) -> T:
    """Poll ``predicate()`` until it returns a truthy value; return that value.

    Args:
        predicate: cheap and side-effect free; it is called at least once, even with a
            zero timeout, and once more at the deadline.
        timeout: seconds before giving up.
        what: the condition in words, for the failure ("the lease expired and the
            daemon freed the hung client's cache").
        detail: called at the deadline, for the state seen then (in the message).

    Raises:
        WaitTimeout: not met within ``timeout``; the message has ``what``, the time
            waited and the last value seen. An exception from ``predicate`` propagates.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            seen = f"; seen: {detail()}" if detail is not None else ""
            raise WaitTimeout(f"not met within {timeout:g} s: {what} (last value: {value!r}){seen}")
        time.sleep(min(interval, deadline - now))


async def until(condition: Callable[[], object], *, timeout: float = 10.0, what: str = "the condition",
                interval: float = 0.001) -> None:
    """``wait_until`` on an event loop: poll ``condition`` (yielding to the loop's other
    tasks between polls, so the client's session tasks run) until it holds; raises
    ``WaitTimeout`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"not met within {timeout:g} s: {what}")
        await asyncio.sleep(interval)


def holds_for(
    predicate: Callable[[], Any], seconds: float, what: str, *, interval: float = POLL_INTERVAL_S
) -> None:
    """Check that ``predicate()`` stays truthy for ``seconds``, polling throughout.

    For claims of absence ("the call is still waiting", "nothing was freed yet"), which
    no condition can end early. Use the shortest window that makes the claim meaningful.

    Raises:
        AssertionError: the predicate was falsy at some poll; says when.
    """
    started = time.monotonic()
    deadline = started + seconds
    while True:
        value = predicate()
        now = time.monotonic()
        if not value:
            raise AssertionError(
                f"stopped holding after {now - started:.3f} s of {seconds:g} s: {what} (value: {value!r})"
            )
        if now >= deadline:
            return
        time.sleep(min(interval, deadline - now))


class Lines:
    """The lines a child process writes to a text pipe, each read with a deadline.

    A daemon thread reads the pipe into a queue; ``next(timeout, what)`` takes one line or
    fails with ``what`` and what the child printed so far. End of file reads as ``None``.
    """

    _EOF = object()

    def __init__(self, pipe: IO[str], name: str = "child") -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._seen: list[str] = []
        self._name = name
        self._thread = threading.Thread(target=self._pump, args=(pipe,), name=f"lines-{name}", daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[str]) -> None:
        try:
            for line in pipe:
                self._queue.put(line)
        except ValueError:  # the pipe was closed under us: the test is tearing down
            pass
        finally:
            self._queue.put(self._EOF)

    def next(self, timeout: float, what: str) -> str | None:
        """The next line without its newline, or ``None`` at end of file.

        Raises:
            WaitTimeout: no line within ``timeout`` seconds.
        """
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            tail = "".join(self._seen[-10:])
            raise WaitTimeout(
                f"{self._name} printed no line within {timeout:g} s: {what}; its last lines:\n{tail}"
            ) from None
        if item is self._EOF:
            self._queue.put(self._EOF)  # every later read sees the end too
            return None
        assert isinstance(item, str)
        self._seen.append(item)
        return item.rstrip("\n")
