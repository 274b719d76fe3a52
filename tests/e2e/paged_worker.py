"""A model worker of a paged pool under remote control, for end-to-end tests: its own
process, its own ``BrokerClient`` (own session, own mapping of the arena), one JSON
command per stdin line, one JSON answer per line ({"ok": ...} or {"error": class,
"message": ...}).

K and V are written token by token through the per-layer tensors (``pool.layer(i)``,
at the slot ``append_token`` returns), with a value that says which sequence, layer,
token and K or V it is (``expected``), so a reader in another process can check every
byte it reads through its own mapping.

Run: python -m tests.e2e.paged_worker TARGET POOL
"""

from __future__ import annotations

import json
import sys

import torch

from kvbroker_client import BrokerClient


def expected(salt: int, layer: int, kv: int, tokens: int, heads: int, dim: int) -> torch.Tensor:
    """The K (kv=0) or V (kv=1) every test worker writes for tokens 0..tokens-1."""
    t = torch.arange(tokens, dtype=torch.float32).view(-1, 1, 1)
    h = torch.arange(heads, dtype=torch.float32).view(1, -1, 1)
    d = torch.arange(dim, dtype=torch.float32).view(1, 1, -1)
    return salt * 1000 + layer * 100 + kv * 50 + t + h / 10 + d / 100


def run(pool, op: str, c: dict):
    lay = pool.layout
    if op == "allocate":
        return pool.allocate_for(c["seq"], c["prompt"], c.get("max_tokens"), on_oom=c.get("on_oom", "reject"),
                                 timeout=c.get("timeout"), priority=c.get("priority"), pinned=c.get("pinned", False))
    if op == "write":  # append tokens one by one, K and V of every layer through the layer tensors
        seq, salt = c["seq"], c["salt"]
        for _ in range(c["tokens"]):
            where = pool.append_token(seq)
            t = pool.tokens_used(seq) - 1
            for layer in range(lay.num_layers):
                flat = pool.layer(layer).view(2, -1, lay.num_kv_heads, lay.head_dim)
                for kv in (0, 1):
                    flat[kv, where.slot] = expected(salt, layer, kv, t + 1, lay.num_kv_heads, lay.head_dim)[t]
        pool.report(seq)
        return {"used": pool.tokens_used(seq), "rpcs": pool.rpc_count, "table": pool.block_table(seq)}
    if op == "attach":
        return pool.attach(c["seq"])
    if op == "check":  # every layer's K and V views equal what the writer wrote
        seq, salt = c["seq"], c["salt"]
        used = pool.tokens_used(seq)
        ok = all(
            torch.equal(view(seq, layer).cpu(), expected(salt, layer, kv, used, lay.num_kv_heads, lay.head_dim))
            for layer in range(lay.num_layers) for kv, view in ((0, pool.k_view), (1, pool.v_view))
        )
        return {"ok": ok, "used": used, "contiguous": pool.is_contiguous(seq)}
    if op == "evicted":
        return pool.evicted(c["seq"])
    if op == "moved":  # a MOVED event arrived and the table is not re-read yet
        return pool.moved(c["seq"])
    if op == "table":  # re-reads a moved sequence's table first
        return pool.block_table(c["seq"])
    if op == "pin":
        pool.pin(c["seq"], c.get("pinned", True))
        return True
    if op == "free":
        return pool.free_for(c["seq"])
    if op == "stats":
        return pool.stats()
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    client = BrokerClient(sys.argv[1])
    pool = client.paged_pool(sys.argv[2], grant_tokens=int(sys.argv[3]) if len(sys.argv) > 3 else 64)
    print(json.dumps({"ok": client.session_id}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            print(json.dumps({"ok": run(pool, op, command)}), flush=True)
        except Exception as err:  # noqa: BLE001 - reported to the test as data
            print(json.dumps({"error": type(err).__name__, "message": str(err)}), flush=True)


if __name__ == "__main__":
    main()
