"""A tenant under remote control, for the safety tests: a separate process with its own
``BrokerClient`` (its own session) that runs one JSON command per stdin line and answers
one JSON line: ``{"ok": ...}`` or ``{"error": "<exception class>", "message": ...,
"session_lost": bool, "typed": bool}``.

Run: ``python -m tests.safety.agent TARGET``
"""

from __future__ import annotations

import json
import sys
import time

import torch

import kvbroker_client
from kvbroker_client import BrokerClient

#: The typed error the client raises once the broker ended its session (added by the
#: client branch; absent on older trees).
SessionLost = getattr(kvbroker_client, "SessionLost", None)


def _session_ended(client: BrokerClient) -> bool:
    """Whether the client has learnt that its session is over (public attribute when the
    client offers one, else the session state of this tree)."""
    for name in ("session_lost", "session_ended"):
        value = getattr(client, name, None)
        if isinstance(value, bool):
            return value
    session = getattr(client, "_session", None)
    state = getattr(session, "state", None)
    return bool(getattr(state, "ended", False))


def run(client: BrokerClient, caches: dict, views: dict, op: str, command: dict):
    """One command (its own function, so that no tensor outlives it in a local)."""
    if op == "allocate":
        cache = client.allocate(**command)
        caches[cache.cache_id] = cache
        return {"cache_id": cache.cache_id, "segment": [cache.handle.segment_id, cache.handle.segment_generation],
                "offset": cache.handle.byte_offset, "shm_name": cache.handle.host.shm_name}
    if op == "fill":  # write one byte value over the whole cache, pinned
        with caches[command["cache_id"]].pinned() as t:
            t.fill_(command["value"])
        return True
    if op == "values":  # the distinct byte values of the cache, read pinned
        with caches[command["cache_id"]].pinned() as t:
            return sorted(int(v) for v in torch.unique(t).tolist())
    if op == "keep_view":  # build a view now and keep it (a worker that holds a tensor)
        views[command["cache_id"]] = caches[command["cache_id"]].tensor()
        return True
    if op == "where":
        cache = caches[command["cache_id"]]
        cache.refresh()
        return {"segment": [cache.handle.segment_id, cache.handle.segment_generation], "offset": cache.handle.byte_offset}
    if op == "release":
        return caches.pop(command["cache_id"]).release(force=command.get("force", False))
    if op == "write_after_resume":
        # A worker resumed after a stop: it may read what the broker already sent it
        # (bounded), then touches its cache the way workers do, through tensor().
        deadline = time.monotonic() + command.get("grace_seconds", 2.0)
        while not _session_ended(client) and time.monotonic() < deadline:
            time.sleep(0.01)
        t = caches[command["cache_id"]].tensor()
        t.fill_(command["value"])
        return "wrote"
    if op == "write_kept_view":  # write through a view built before the stop
        views[command["cache_id"]].fill_(command["value"])
        return "wrote"
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    client = BrokerClient(sys.argv[1])
    caches: dict = {}
    views: dict = {}
    print(json.dumps({"ok": client.session_id}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            result = run(client, caches, views, op, command)
            print(json.dumps({"ok": result}), flush=True)
        except Exception as err:  # noqa: BLE001 - reported to the test as data
            print(json.dumps({
                "error": type(err).__name__, "message": str(err)[:2000],
                "session_lost": SessionLost is not None and isinstance(err, SessionLost),
                "typed": isinstance(err, kvbroker_client.KvBrokerError),
            }), flush=True)


if __name__ == "__main__":
    main()
