"""A model worker that keeps its views, under remote control (issue 13's tests).

A separate process with its own ``BrokerClient`` that executes one JSON command per stdin
line and answers one JSON line, ``{"ok": ...}`` or ``{"error": "<class>", "message": ...}``.
Unlike ``tests/e2e/agent.py`` it keeps the tensor view it built at allocation (``views``),
as a careless worker would, so a test can write through a view that outlived its session.

Run: python -m tests.client.worker TARGET
"""

from __future__ import annotations

import json
import sys

from kvbroker_client import BrokerClient
from tests.support.wait import wait_until


def run(client: BrokerClient, caches: dict, views: dict, op: str, command: dict):
    if op == "allocate":
        value = command.pop("value")
        cache = client.allocate(**command)
        caches[cache.cache_id], views[cache.cache_id] = cache, cache.tensor()
        views[cache.cache_id].fill_(value)
        h = cache.handle
        return {"cache_id": cache.cache_id, "place": [h.segment_id, h.segment_generation, h.byte_offset]}
    if op == "lapse":
        # Stop heartbeating (a hung worker) until the broker ends the session.
        lost = client.core.sessions_lost
        client.core.suspend_heartbeats()
        wait_until(lambda: client.core.sessions_lost > lost, 30.0, "the session lost")
        client.core.suspend_heartbeats(False)
        return client.core.last_loss
    if op == "write_old":  # through the view kept since the allocation
        views[command["cache_id"]].fill_(command["value"])
        return True
    if op == "read_old":
        view = views[command["cache_id"]]
        return sorted({int(b) for b in view.unique()})
    if op == "use":  # what a worker does next: a fresh view of its cache
        return sorted({int(b) for b in caches[command["cache_id"]].tensor().unique()})
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    client = BrokerClient(sys.argv[1], timeout_s=10)
    caches: dict = {}
    views: dict = {}
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            answer = {"ok": run(client, caches, views, op, command)}
        except Exception as err:  # noqa: BLE001 - every failure goes back to the test
            answer = {"error": type(err).__name__, "message": str(err)}
        print(json.dumps(answer), flush=True)
    client.close()


if __name__ == "__main__":
    main()
