"""Paged KV pools against contiguous caches, and the cost of a token append (issue 11).

Everything runs against a real daemon (host device: POSIX shared memory) through the
real client (``kvbroker_client.PagedPool`` and ``BrokerClient.allocate``).

1. Memory: tokens held at the first refusal
-------------------------------------------

A seeded trace of requests: prompt lengths log-normal (median 200 tokens, sigma 1.0,
1 to 4096), output lengths log-normal (median 150, sigma 1.2, 1 to ``MAX_NEW_TOKENS``
= 1024): long-tailed, as chat traffic is. Simulated steps: each step one request arrives
(its prompt is written at once: the prefill) and every live sequence appends one token
(the decode); a sequence that reached its output length is freed. The run stops at the
**first refusal** (an arrival or an append the memory cannot hold). The same trace is
replayed on:

- ``paged``: a paged pool of ``--blocks`` blocks of 16 tokens (2,048 by default: the
  seed's 32,768 tokens), through ``PagedPool.allocate_for(prompt, max_tokens=prompt +
  1024)`` and ``append_token`` (the default grant of 256 tokens);
- ``contiguous``: the seed's "fixed maximum": one contiguous cache per request of
  ``(prompt + 1024) x bytes_per_token`` bytes, in a plain pool of the same bytes
  (segment as large as the pool, blocks of one KV block).

``tokens_vs_contiguous_ratio`` = tokens held (written and live) at the paged pool's
first refusal / at the contiguous pool's. Target >= 2. ``waste_fraction`` = token slots
granted but not written at the paged pool's first refusal / the arena's slots. Target
< 0.04.

2. Append cost
--------------

``--sequences`` sequences (8) of ``--tokens`` tokens each (2,000), appended round robin,
each token's K and V written into every layer's tensor at the returned slot (one
``index_put`` per layer and K/V). Baseline, in the same run: the same writes into a
plain local tensor of the same shape at a slot the loop computes itself. The layout:
4 layers, 8 KV heads, head dim 64, float16; the pool twice the tokens written (room to
spare: grants shrink as a pool fills). ``append_overhead_us`` = (paged - baseline) /
tokens, each the best of ``--repeat`` (9) interleaved runs. Target < 5 us. The arena is
mapped with ``populate=True`` (the seed's ``warmup()``), as the local tensor is touched
when it is zeroed: a first write to a page costs its fault in either. The writes
dominate both loops, so that difference is noisy on a shared machine; the append call
alone against the slot arithmetic alone is reported beside it
(``append_call_overhead_us``). ``rpcs_per_1000_tokens`` = the pool's RPCs during the
appends (grants) per 1,000 appended tokens. Target < 10.

3. Warm-up
----------

Three pools with one arena each (``--warm-mib`` MiB): the daemon prefaults one at
creation (``prefault = true``), not the other two; a client maps them and writes one
token into every block (first touch), timed; on the third the client populates the
arena on map first (``paged_pool(populate=True)``), timed apart.

Output: a table; with ``--json`` one object with ``tokens_vs_contiguous_ratio``,
``waste_fraction``, ``rpcs_per_1000_tokens``, ``append_overhead_us`` and the rest.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402

MAX_NEW_TOKENS = 1024
BLOCK_TOKENS = 16
# Part 1's layout: 1 layer, 2 KV heads, head dim 64, float16 = 512 bytes a token.
MEMORY_LAYOUT = dict(num_layers=1, num_kv_heads=2, head_dim=64, dtype="float16")
APPEND_LAYOUT = dict(num_layers=4, num_kv_heads=8, head_dim=64, dtype="float16")


def kv_table(name: str, layout: dict, tokens: int, prefault: bool = True) -> str:
    lines = [f"[[pools]]\nname = '{name}'\n[pools.kv]"] + [f"{k} = {v!r}" for k, v in layout.items()]
    lines += [f"block_tokens = {BLOCK_TOKENS}", f"max_tokens = {tokens}", f"prefault = {str(prefault).lower()}"]
    return "\n".join(lines).replace("'", '"') + "\n"


def trace(seed: int, n: int) -> list[tuple[int, int]]:
    rng = harness.seeded_rng(seed)
    out = []
    for _ in range(n):
        prompt = min(4096, max(1, round(rng.lognormvariate(math.log(200), 1.0))))
        output = min(MAX_NEW_TOKENS, max(1, round(rng.lognormvariate(math.log(150), 1.2))))
        out.append((prompt, output))
    return out


def replay_paged(pool, requests: list[tuple[int, int]]) -> dict:
    from kvbroker_client import OutOfTokens

    live: dict[str, list[int]] = {}  # seq -> [tokens used, tokens left to generate]
    rpcs_before = pool.rpc_count
    appended = 0
    for step, (prompt, output) in enumerate(requests):
        seq = f"r{step}"
        try:
            pool.allocate_for(seq, prompt, max_tokens=prompt + MAX_NEW_TOKENS)
            for name, state in list(live.items()):  # one decode step of every earlier sequence
                pool.append_token(name)
                appended += 1
                state[0] += 1
                state[1] -= 1
                if state[1] == 0:
                    pool.free_for(name)
                    del live[name]
            live[seq] = [prompt, output]
        except OutOfTokens:
            break
    stats = pool.block_map().stats
    used = sum(state[0] for state in live.values())
    arena_tokens = stats.num_blocks * BLOCK_TOKENS
    result = {
        "arrivals": step, "live": len(live), "tokens_held": used,
        "tokens_reserved": stats.tokens_reserved, "arena_tokens": arena_tokens,
        "waste_fraction": (stats.tokens_reserved - used) / arena_tokens,
        "partial_block_waste_fraction": sum(-s[0] % BLOCK_TOKENS for s in live.values()) / arena_tokens,
        "rpcs_per_1000_tokens_with_allocate_and_free": 1000 * (pool.rpc_count - rpcs_before) / max(1, appended),
    }  # fmt: skip
    for name in list(live):
        pool.free_for(name)
    return result


def replay_contiguous(client, pool_name: str, bytes_per_token: int, requests: list[tuple[int, int]]) -> dict:
    from kvbroker_client import CacheExhausted

    live: dict[str, list] = {}
    for step, (prompt, output) in enumerate(requests):
        try:
            # pinned: a full pool refuses rather than evicting a live request's cache
            cache = client.allocate(pool_name, size_bytes=(prompt + MAX_NEW_TOKENS) * bytes_per_token, pinned=True)
        except CacheExhausted:
            break
        for name, state in list(live.items()):  # one decode step of every earlier sequence
            state[0] += 1
            state[1] -= 1
            if state[1] == 0:
                state[2].release()
                del live[name]
        live[cache.cache_id] = [prompt, output, cache]
    used = sum(state[0] for state in live.values())
    for state in live.values():
        state[2].release()
    return {"arrivals": step, "live": len(live), "tokens_held": used}


def part_memory(args, log) -> dict:
    from kvbroker.kvlayout import KvLayout
    from kvbroker_client import BrokerClient

    layout = KvLayout(**MEMORY_LAYOUT, block_tokens=BLOCK_TOKENS)
    tokens = args.blocks * BLOCK_TOKENS
    arena = layout.bytes_for(tokens)
    config = (f'[devices]\nhost_capacity = "{2 * arena + (64 << 20)}"\n[[pools]]\nname = "default"\n'
              + kv_table("paged", MEMORY_LAYOUT, tokens)
              + f'[[pools]]\nname = "contiguous"\nmax_bytes = {arena}\nsegment_bytes = {arena}\n'
              f'block_bytes = {layout.bytes_per_block}\ngc_threshold = 1.0\n')  # fmt: skip
    requests = trace(args.seed, 100_000)
    with harness.daemon(config=config) as daemon, BrokerClient(daemon.target) as client:
        started = time.perf_counter()
        paged = replay_paged(client.paged_pool("paged"), requests)
        log(f"paged: {paged['tokens_held']} tokens held at the first refusal ({time.perf_counter() - started:.1f} s)")
        contiguous = replay_contiguous(client, "contiguous", layout.bytes_per_token, requests)
        log(f"contiguous: {contiguous['tokens_held']} tokens held at the first refusal")
    return {"paged": paged, "contiguous": contiguous,
            "tokens_vs_contiguous_ratio": harness.safe_ratio(paged["tokens_held"], contiguous["tokens_held"])}  # fmt: skip


def part_append(args, log) -> dict:
    import torch

    from kvbroker_client import DEFAULT_GRANT_TOKENS, BrokerClient

    total = args.sequences * args.tokens
    config = '[devices]\nhost_capacity = "512MiB"\n[[pools]]\nname = "default"\n' + kv_table(
        "paged", APPEND_LAYOUT, 2 * (total + args.sequences * (DEFAULT_GRANT_TOKENS + BLOCK_TOKENS)))
    heads, dim, layers = APPEND_LAYOUT["num_kv_heads"], APPEND_LAYOUT["head_dim"], APPEND_LAYOUT["num_layers"]
    k = torch.ones(heads, dim, dtype=torch.float16)
    v = torch.full((heads, dim), 2.0, dtype=torch.float16)
    with harness.daemon(config=config) as daemon, BrokerClient(daemon.target) as client:
        pool = client.paged_pool("paged", populate=True)  # the seed's warmup(): as the local tensor, touched
        flats = [pool.layer(i).view(2, -1, heads, dim) for i in range(layers)]
        local = [torch.zeros_like(f) for f in flats]
        names = [f"s{i}" for i in range(args.sequences)]
        paged_runs, base_runs, call_runs, slot_runs, rpcs, rpc_s, aheads = [], [], [], [], [], [], []
        for _ in range(args.repeat):  # interleaved: the machine's load hits both alike
            for name in names:
                pool.allocate_for(name, 0)
            before, before_s, before_ahead = pool.rpc_count, pool.rpc_seconds, pool.grants_ahead
            append = pool.append_token
            with harness.gc_paused():
                started = time.perf_counter_ns()
                for _t in range(args.tokens):
                    for name in names:
                        slot = append(name).slot
                        for f in flats:
                            f[0, slot] = k
                            f[1, slot] = v
                paged_runs.append(time.perf_counter_ns() - started)
            rpcs.append(pool.rpc_count - before)
            rpc_s.append(pool.rpc_seconds - before_s)
            aheads.append(pool.grants_ahead - before_ahead)
            for name in names:
                pool.free_for(name)
            with harness.gc_paused():
                started = time.perf_counter_ns()
                used = [0] * len(names)
                for _t in range(args.tokens):
                    for i in range(len(names)):
                        slot = i * args.tokens + used[i]
                        used[i] += 1
                        for f in local:
                            f[0, slot] = k
                            f[1, slot] = v
                base_runs.append(time.perf_counter_ns() - started)
            # The append alone against the slot arithmetic alone (no K/V writes).
            for name in names:
                pool.allocate_for(name, 0)
            with harness.gc_paused():
                started = time.perf_counter_ns()
                for _t in range(args.tokens):
                    for name in names:
                        append(name)
                call_runs.append(time.perf_counter_ns() - started)
                started = time.perf_counter_ns()
                used = [0] * len(names)
                for _t in range(args.tokens):
                    for i in range(len(names)):
                        slot = i * args.tokens + used[i]
                        used[i] += 1
                slot_runs.append(time.perf_counter_ns() - started)
            for name in names:
                pool.free_for(name)
        grant = pool.grant_tokens
    paged_us, base_us = min(paged_runs) / total / 1000, min(base_runs) / total / 1000
    call_us = (min(call_runs) - min(slot_runs)) / total / 1000
    log(f"append: {paged_us:.2f} us a token (local baseline {base_us:.2f} us), {rpcs[0]} RPCs for {total} tokens")
    return {"append_us": paged_us, "baseline_us": base_us, "append_overhead_us": paged_us - base_us,
            "append_call_overhead_us": call_us, "rpcs_per_1000_tokens": 1000 * rpcs[0] / total,
            "grant_rpc_us_per_token": min(rpc_s) / total * 1e6, "grant_rpc_ms": min(rpc_s) / max(1, rpcs[0]) * 1000,
            "grants_ahead": aheads[0],
            "grant_tokens": grant, "tokens": total, "layers": layers, "repeat": args.repeat}  # fmt: skip


def part_warmup(args, log) -> dict:
    import torch

    from kvbroker_client import BrokerClient

    layout = dict(num_layers=1, num_kv_heads=8, head_dim=64, dtype="float16")  # 2 KiB a token, 32 KiB a block
    tokens = args.warm_mib * 512
    config = (f'[devices]\nhost_capacity = "{3 * args.warm_mib + 64}MiB"\n[[pools]]\nname = "default"\n'
              + kv_table("prefaulted", layout, tokens) + kv_table("cold", layout, tokens, prefault=False)
              + kv_table("populated", layout, tokens, prefault=False))  # fmt: skip
    out = {}
    with harness.daemon(config=config) as daemon, BrokerClient(daemon.target) as client:
        for name, populate in (("prefaulted", False), ("cold", False), ("populated", True)):
            pool = client.paged_pool(name, populate=populate)
            flat = pool.layer(0).view(2, -1, 8, 64)
            one = torch.ones(8, 64, dtype=torch.float16)
            started = time.perf_counter_ns()
            for block in range(pool.num_blocks):
                flat[0, block * BLOCK_TOKENS] = one
            first_touch = (time.perf_counter_ns() - started) / pool.num_blocks / 1000
            out[name] = {"first_write_us_per_block": first_touch, "populate_ms": pool.populate_seconds * 1000}
            log(f"warm-up {name}: {first_touch:.2f} us per block's first token write"
                + (f" after populating in {pool.populate_seconds * 1000:.1f} ms" if populate else ""))
        prefault = [line for line in daemon.log().splitlines() if "prefaulted in" in line]
    out["daemon_prefault_log"] = prefault[0].split("paged pool ", 1)[-1] if prefault else ""
    return out


def table(result: dict) -> str:
    m, a, w = result["memory"], result["append"], result["warmup"]
    rows = [
        "paged KV pools (benchmarks/paged.py)",
        f"  memory at the first refusal: paged {m['paged']['tokens_held']} tokens held "
        f"({m['paged']['live']} sequences), contiguous {m['contiguous']['tokens_held']} "
        f"({m['contiguous']['live']} sequences): {harness.format_ratio(m['tokens_vs_contiguous_ratio'])} (target >= 2x)",
        f"  waste (granted, unwritten slots / arena): {100 * m['paged']['waste_fraction']:.2f} % "
        f"(partial last blocks {100 * m['paged']['partial_block_waste_fraction']:.2f} %; target < 4 %)",
        f"  append: {a['append_us']:.2f} us a token vs {a['baseline_us']:.2f} us into a local tensor "
        f"({a['layers']} layers, K and V, best of {a['repeat']}): overhead {a['append_overhead_us']:.2f} us "
        f"(target < 5 us); append_token alone {a['append_call_overhead_us']:.2f} us over the slot arithmetic, "
        f"of which waiting on grants {a['grant_rpc_us_per_token']:.2f} us ({a['grant_rpc_ms']:.2f} ms a grant; "
        f"{a['grants_ahead']} of {round(a['rpcs_per_1000_tokens'] * a['tokens'] / 1000)} sent ahead)",
        f"  RPCs per 1,000 appended tokens: {a['rpcs_per_1000_tokens']:.2f} at grants of {a['grant_tokens']} "
        f"tokens (target < 10); {m['paged']['rpcs_per_1000_tokens_with_allocate_and_free']:.2f} in the trace "
        "counting allocate and free",
        "  first token write per block: " + ", ".join(
            f"{name} {w[name]['first_write_us_per_block']:.2f} us" for name in ("cold", "prefaulted", "populated"))
        + f" (client populate {w['populated']['populate_ms']:.1f} ms; daemon {w['daemon_prefault_log']})",
    ]  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout (the table on stderr)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--blocks", type=int, default=2048, help="blocks of the paged pool in part 1 (default 2048)")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per sequence in part 2")
    parser.add_argument("--repeat", type=int, default=9, help="repetitions of part 2 (the best counts)")
    parser.add_argument("--warm-mib", type=int, default=256, help="MiB per arena in part 3 (default 256)")
    args = parser.parse_args(argv)
    log = harness.progress_logger()
    result = {"memory": part_memory(args, log), "append": part_append(args, log), "warmup": part_warmup(args, log)}
    result |= {
        "tokens_vs_contiguous_ratio": result["memory"]["tokens_vs_contiguous_ratio"],
        "waste_fraction": result["memory"]["paged"]["waste_fraction"],
        "rpcs_per_1000_tokens": result["append"]["rpcs_per_1000_tokens"],
        "append_overhead_us": result["append"]["append_overhead_us"],
        "seed": args.seed,
    }
    harness.emit(result, table(result), as_json=args.json, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
