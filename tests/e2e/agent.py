"""A model worker under remote control, for end-to-end tests: a separate process with
its own BrokerClient (its own session) that executes one JSON command per stdin line
and answers one JSON line: {"ok": ...} or {"error": "<exception class>", "message": ...}.
``state`` reports what the client has applied from its event stream (evicted, stale).

Run: python -m tests.e2e.agent TARGET
"""

from __future__ import annotations

import json
import sys
import time

import torch

from kvbroker_client import BrokerClient


def run(client: BrokerClient, caches: dict, op: str, command: dict):
    """One command. A function of its own so that no view outlives it in a local."""
    if op == "allocate":
        cache = client.allocate(**command)
        caches[cache.cache_id] = cache
        return cache.cache_id
    if op == "attach":
        cache = client.attach(command["cache_id"])
        caches[cache.cache_id] = cache
        return cache.cache_id
    if op in ("fill", "check"):
        t = caches[command["cache_id"]].tensor()
        expected = torch.arange(t.numel(), dtype=torch.int64).remainder(251).to(torch.uint8) ^ command["salt"]
        if op == "fill":
            t.copy_(expected)
            return True
        return bool(torch.equal(t, expected))
    if op == "offset":
        return caches[command["cache_id"]].handle.byte_offset
    if op == "state":
        # What this client has learnt from its Watch stream so far: a test polls this to
        # know that an event reached the client before it tests the event's effect.
        cache = caches[command["cache_id"]]
        return {"evicted": cache.evicted, "stale": cache.stale, "handle_epoch": cache.handle.epoch}
    if op == "release":
        return caches.pop(command["cache_id"]).release(force=command.get("force", False))
    if op == "drop_views":
        import gc

        gc.collect()
        client.report_unmapped()
        return True
    if op == "sleep":
        # A deliberately busy worker (it answers nothing meanwhile); not a wait.
        time.sleep(command["seconds"])
        return True
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    client = BrokerClient(sys.argv[1])
    caches: dict = {}
    print(json.dumps({"ok": client.session_id}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            result = run(client, caches, op, command)
            print(json.dumps({"ok": result}), flush=True)
        except Exception as err:  # noqa: BLE001 - reported to the test as data
            print(json.dumps({"error": type(err).__name__, "message": str(err)}), flush=True)


if __name__ == "__main__":
    main()
