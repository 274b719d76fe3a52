"""The commands that act or probe: ``release``, ``evict``, ``pool set`` and ``ping``.

Each is a function ``(client, args) -> text`` like the views, with its rendering as a
pure function of the response (tested without a broker). Evict and SetPoolLimits are
called through the client's ``drive`` (the typed errors and credentials of every other
call) with the request built here.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvbroker.cli.formatting import dumps, format_bytes, format_duration, format_latency, to_json
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import BrokerClient, KvBrokerError
from kvbroker_client.calls import channel_options
from kvbroker_client.credentials import Credentials
from kvbroker_client.errors import from_rpc_error

SERVICE = pb.DESCRIPTOR.services_by_name["CacheBroker"].full_name


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# -- release ----------------------------------------------------------------------------


def render_release(cache_id: str, freed: bool, force: bool) -> str:
    if freed:
        return f"cache {cache_id} freed"
    if force:
        return f"cache {cache_id} not freed: it was already gone (a pending one is freed once ready)"
    return (f"cache {cache_id} not freed: other holders hold it or it is retained "
            "(--force frees it unless another holder pins it)")  # fmt: skip


def cmd_release(client: BrokerClient, args: argparse.Namespace) -> str:
    freed = client.release(args.cache_id, force=args.force)
    return to_json(pb.ReleaseResponse(freed=freed)) if args.json else render_release(args.cache_id, freed, args.force)


# -- evict ------------------------------------------------------------------------------


def render_evict(reply: pb.EvictResponse, pool: str, idle_only: bool) -> str:
    what = "idle retained cache" if idle_only else "cache"
    kept = "pinned, pending or held" if idle_only else "pinned or pending"
    text = (f"evicted {_plural(reply.caches_evicted, what)} ({format_bytes(reply.bytes_evicted)}) from pool {pool}; "
            f"{reply.caches_kept} kept ({kept})")  # fmt: skip
    if reply.cache_ids:
        listed = ", ".join(reply.cache_ids[:10]) + (", ..." if reply.caches_evicted > 10 else "")
        text += f"\n  {listed}"
    return text


def cmd_evict(client: BrokerClient, args: argparse.Namespace) -> str:
    request = pb.EvictRequest(pool=args.pool, idle_only=args.idle, device=args.device)
    reply = client.drive(client.core.unary("Evict", request))
    return to_json(reply) if args.json else render_evict(reply, args.pool, args.idle)


# -- pool set ---------------------------------------------------------------------------


def _change(name: str, before: str, after: str) -> str:
    return f"{name} {after}" if before == after else f"{name} {before} -> {after}"


def render_limits(reply: pb.SetPoolLimitsResponse) -> str:
    """``pool set``: what changed, what it cost, and that it lasts until a restart."""
    b, a = reply.before, reply.after
    verb = "would be" if reply.dry_run else "is now"
    lines = [
        f"pool {reply.pool} {verb}: " + ", ".join((
            _change("max", format_bytes(b.max_bytes), format_bytes(a.max_bytes)),
            _change("min", format_bytes(b.min_bytes), format_bytes(a.min_bytes)),
            _change("priority", str(b.priority), str(a.priority)),
        ))
    ]  # fmt: skip
    if reply.caches_evicted or reply.segments_retired or reply.segments_draining:
        evicted = "would evict" if reply.dry_run else "evicted"
        parts = [f"{evicted} {_plural(reply.caches_evicted, 'cache')} ({format_bytes(reply.bytes_evicted)})"]
        if reply.segments_retired:
            parts.append(f"{_plural(reply.segments_retired, 'segment')} ({format_bytes(reply.bytes_retired)}) "
                         f"{'would go' if reply.dry_run else 'went'} back to the device")  # fmt: skip
        if reply.segments_draining:
            parts.append(f"{_plural(reply.segments_draining, 'segment')} ({format_bytes(reply.bytes_draining)}) "
                         "drain until their mappers unmap them")  # fmt: skip
        lines.append("; ".join(parts))
        if reply.cache_ids:
            lines.append("  " + ", ".join(reply.cache_ids[:10]) + (", ..." if reply.caches_evicted > 10 else ""))
    if not reply.dry_run:
        lines.append("(until the daemon restarts: the configuration file is not changed)")
    return "\n".join(lines)


def cmd_pool_set(client: BrokerClient, args: argparse.Namespace) -> str:
    request = pb.SetPoolLimitsRequest(pool=args.pool, dry_run=args.dry_run)
    for field, value in (("max_bytes", args.max), ("min_bytes", args.min), ("priority", args.priority)):
        if value is not None:
            setattr(request, field, value)
    reply = client.drive(client.core.unary("SetPoolLimits", request))
    return to_json(reply) if args.json else render_limits(reply)


# -- ping -------------------------------------------------------------------------------


def ping(client: BrokerClient, args: argparse.Namespace) -> dict[str, Any]:
    """Health checks of the CacheBroker service over a fresh channel: the first one's
    round trip includes connecting; then ``args.count`` more. With the broker's version,
    instance and uptime from one Stats call when the caller may make it."""
    credentials = Credentials.resolve(args.token, args.tls_ca, args.tls_cert, args.tls_key)
    target = client.target
    result: dict[str, Any] = {"target": target, "service": SERVICE}
    with credentials.channel(target, channel_options(())) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        rtts = []
        for _ in range(1 + args.count):
            started = time.perf_counter()
            try:
                reply = check(request, timeout=args.timeout)
            except grpc.RpcError as err:
                raise from_rpc_error(err, target=target) from None
            rtts.append(time.perf_counter() - started)
    result["status"] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    result["connect_seconds"], checks = rtts[0], rtts[1:]
    result["rtt_seconds"] = {"min": min(checks), "avg": sum(checks) / len(checks), "max": max(checks),
                             "count": len(checks)}  # fmt: skip
    try:
        stats = client.stats()
    except KvBrokerError as err:  # e.g. UNAUTHENTICATED: the health answer stands alone
        result["stats_error"] = err.message
    else:
        result.update(version=stats.version, instance_id=stats.instance_id, uptime_seconds=stats.uptime_seconds,
                      sessions=stats.sessions)  # fmt: skip
    return result


def render_ping(result: dict[str, Any]) -> str:
    rtt = result["rtt_seconds"]
    lines = [f"kvbroker at {result['target']}: {result['status']}"]
    if "version" in result:
        lines.append(f"  version {result['version']}, instance {result['instance_id']}, "
                     f"up {format_duration(result['uptime_seconds'])}, {_plural(result['sessions'], 'session')}")  # fmt: skip
    else:
        lines.append(f"  (no Stats: {result['stats_error']})")
    ms = lambda s: f"{s * 1000:.2f}" if not math.isnan(s) else "-"  # noqa: E731
    lines.append(f"  round trip {ms(rtt['min'])} / {ms(rtt['avg'])} / {ms(rtt['max'])} ms (min / avg / max of "
                 f"{_plural(rtt['count'], 'health check')}); connecting and the first check: "
                 f"{format_latency(result['connect_seconds'])}")  # fmt: skip
    return "\n".join(lines)


def cmd_ping(client: BrokerClient, args: argparse.Namespace) -> tuple[str, int]:
    """Returns the text and the exit code: 0 when the service is SERVING, else 1."""
    result = ping(client, args)
    text = dumps(result) if args.json else render_ping(result)
    return text, 0 if result["status"] == "SERVING" else 1
