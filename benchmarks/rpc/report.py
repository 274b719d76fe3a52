"""The table of benchmarks/rpc_latency.py (what ``--json`` sends to stderr)."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import ratios
from benchmarks.rpc.during_create import render_during_create
from benchmarks.rpc.handoff import HANDOFF_SIZES


def render(result: dict[str, Any]) -> str:
    lines = []
    single = result["single"]
    floor = single["floor"]
    lines.append(
        f"kvbroker RPC latency: one caller, Unix socket, sync grpc client, {single['floor']['n']} "
        f"interleaved rounds after {result['config']['warmup']} warm-up rounds"
    )
    header = f"{'method':<18}{'n':>7}{'P50 ms':>9}{'P90 ms':>9}{'P99 ms':>9}{'x P50':>8}{'x P90':>8}{'x P99':>8}{'RPC/s':>9}"
    lines += [header, "-" * len(header)]
    for name in ("floor", "allocate", "release", "allocate_release", "attach", "stats"):
        s = single[name]
        r = ratios(s, floor)
        lines.append(
            f"{name:<18}{s['n']:>7}{s['p50_ms']:>9.3f}{s['p90_ms']:>9.3f}{s['p99_ms']:>9.3f}"
            f"{r['p50_ratio']:>8.2f}{r['p90_ratio']:>8.2f}{r['p99_ratio']:>8.2f}{1000 / s['mean_ms']:>9.0f}"
        )
    lines.append("(x = ratio to the floor's same percentile; RPC/s = 1 / mean latency of that method alone)")
    lines.append("")
    cpu = result["cpu"]
    lines.append(f"CPU per call, back-to-back batches ({cpu['floor']['calls']} calls each; /proc tick {cpu['clock_tick_s'] * 1e3:.0f} ms)")
    header = f"{'method':<18}{'daemon us':>11}{'extra us':>10}{'client us':>11}{'wall us':>9}"
    lines += [header, "-" * len(header)]
    for name in ("floor", "allocate_release", "attach", "stats"):
        c = cpu[name]
        lines.append(
            f"{name:<18}{c['daemon_cpu_us']:>11.0f}{c['daemon_cpu_extra_us']:>10.0f}{c['client_cpu_us']:>11.0f}{c['wall_us']:>9.0f}"
        )
    lines.append("(extra = daemon CPU above the floor's, per RPC; allocate_release is one pair = two RPCs)")
    lines.append("")
    mode = result["config"]["callers_mode"]
    lines.append(f"Throughput: N callers ({mode}, one channel each), alternating timed windows")
    header = f"{'callers':>7}  {'method':<10}{'n':>8}{'RPC/s':>9}{'pairs/s':>9}{'P50 ms':>9}{'P90 ms':>9}{'P99 ms':>9}{'x P50':>8}{'x P99':>8}"
    lines += [header, "-" * len(header)]
    for n, entry in result["callers"].items():
        for method in ("floor", "allocate"):
            s = entry[method]
            pairs = f"{s['pairs_per_s']:>9.0f}" if "pairs_per_s" in s else f"{'':>9}"
            rr = f"{s['p50_ratio']:>8.2f}{s['p99_ratio']:>8.2f}" if "p50_ratio" in s else f"{'':>8}{'':>8}"
            lines.append(
                f"{n:>7}  {method:<10}{s['n']:>8}{s['rpc_per_s']:>9.0f}{pairs}{s['p50_ms']:>9.3f}"
                f"{s['p90_ms']:>9.3f}{s['p99_ms']:>9.3f}{rr}"
            )
    lines.append("(allocate = Allocate timed + Release untimed; RPC/s counts both RPCs)")
    lines.append("")
    h = result["handoff"]
    lines.append(
        f"Hand-off to a fresh process (median of {h['runs']}): Attach + SegmentMapper(populate=False) "
        "vs. gRPC server stream of the same bytes (4 MiB chunks); every cell a median of its own"
    )
    header = f"{'size':<6}{'path':<8}{'hold ms':>10}{'(rpc':>8}{'+ map)':>8}{'1st read':>10}{'usable ms':>11}{'bytes ok':>10}"
    lines += [header, "-" * len(header)]
    for label, _nbytes in HANDOFF_SIZES:
        e = h[label]
        size = label.replace("mib", " MiB").replace("gib", " GiB")
        lines.append(
            f"{size:<6}{'attach':<8}{e['attach_hold_ms']:>10.3f}{e['attach_rpc_ms']:>8.3f}{e['attach_map_ms']:>8.3f}"
            f"{e['attach_first_read_ms']:>10.2f}{e['attach_usable_ms']:>11.2f}{str(e['bytes_ok']):>10}"
        )
        if "remap_hold_ms" in e:
            lines.append(
                f"{'':<6}{'remap':<8}{e['remap_hold_ms']:>10.3f}{e['remap_rpc_ms']:>8.3f}{e['remap_map_ms']:>8.3f}"
                f"{e['remap_first_read_ms']:>10.2f}{'':>11}{'':>10}   (n={e['remap_n']}, new mapper each)"
            )
        lines.append(
            f"{'':<6}{'stream':<8}{e['stream_hold_ms']:>10.2f}{'':>8}{'':>8}"
            f"{e['stream_first_read_ms']:>10.2f}{e['stream_usable_ms']:>11.2f}"
        )
        lines.append(
            f"{'':<6}{'ratio':<8}{e['stream_vs_attach_hold_ratio']:>9.0f}x{'':>8}{'':>8}{'':>10}"
            f"{e['stream_vs_attach_usable_ratio']:>10.1f}x   (stream / attach)"
        )
    alloc_s = {c["label"]: c["allocate_s"] for c in h["caches"]}
    lines.append(
        f"producer's Allocate: 1 MiB {alloc_s['1mib'] * 1e3:.1f} ms (existing segment), 1 GiB "
        f"{alloc_s['1gib'] * 1e3:.0f} ms (a new 1 GiB segment, created and prefaulted by the daemon)"
    )
    lines.append(
        f"cold floor (Health/Check after the same 20 ms idle, n={h['cold_floor_n']}): {h['cold_floor_ms']:.3f} ms; "
        f"1 GiB attach hold = {h['1gib']['attach_hold_vs_cold_floor_ratio']:.2f}x the cold floor"
    )
    if "during_create" in result:
        lines.append("")
        lines.append(render_during_create(result["during_create"]))
    lines.append("")
    lines.append("Targets")
    for name, t in result["targets"].items():
        lines.append(f"  {name:<22} {t['value']:>8.3f} {t['op']} {t['target']:<5}  {'met' if t['met'] else 'MISSED'}")
    d = result["daemon"]
    lines.append(
        f"daemon: started in {d['start_seconds']:.1f} s ({d['entry']}), SIGTERM exit code {d['exit_code']}; "
        f"total run {result['run_seconds']:.0f} s"
    )
    return "\n".join(lines)

