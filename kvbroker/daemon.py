"""The composition root: configuration -> devices -> backends -> core -> engine -> server.

Lifecycle of ``kvbroker serve``:

1. Load the configuration (defaults < TOML < ``KVBROKER_*`` < flags); an error stops the
   start with a message naming the key, exit code 2.
2. Pick devices: every visible GPU (``auto`` or ``cuda``), else the host device. The CUDA
   allocator is configured (``expandable_segments:False``) before torch is imported.
3. Unlink shm objects that a dead broker left behind, build the core, the backends, the
   engine and the gRPC server (health + reflection), bind every address, start.
4. On SIGTERM or SIGINT: health goes NOT_SERVING, in-flight calls get ``grace_seconds``
   to finish, every segment is freed (host shm objects unlinked), the Unix socket is
   removed, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass

from kvbroker import __version__
from kvbroker.config import ALL_DEVICES, BrokerConfig, ConfigError, load_config
from kvbroker.core import Broker, DeviceSpec, PoolSpec
from kvbroker.core.errors import BrokerError, InvalidArgument, amount
from kvbroker.core.types import KiB
from kvbroker.engine import Engine, EngineSettings, Persistence
from kvbroker.engine.paged import PagedPools, PagedPoolSpec
from kvbroker.memory.backend import SegmentMemory
from kvbroker.persistence.settings import OFFLOAD_SUBDIR
from kvbroker.memory.cuda import CUDA_MIN_SEGMENT_BYTES, CUDA_SEGMENT_ALIGNMENT_BYTES
from kvbroker.security import PeerHandshakeServer, PeerRegistry
from kvbroker.server.app import BrokerServer, TlsFiles, create_server
from kvbroker.server.registration import SERVICE
from kvbroker.wire import PEER_SOCKET_SUFFIX
from kvbroker.telemetry.service import Telemetry

log = logging.getLogger("kvbroker")

HOST_DEVICE_ID = "host"


@dataclass(frozen=True)
class DevicePlan:
    """The devices to serve: specs for the core and how to build each backend."""

    specs: tuple[DeviceSpec, ...]
    gpu_index_to_uuid: dict[int, str]


def plan_devices(config: BrokerConfig) -> DevicePlan:
    """Choose the devices: GPUs when asked for (or found, with ``auto``), else host."""
    gpus = []
    if config.device_kind in ("auto", "cuda"):
        from kvbroker.memory.cuda import configure_cuda_allocator_env, discover_gpus

        configure_cuda_allocator_env()
        gpus = discover_gpus()
        if config.device_kind == "cuda" and not gpus:
            raise ConfigError("devices.kind", "is 'cuda' but no CUDA GPU is visible")
    if gpus:
        specs = tuple(
            DeviceSpec(
                gpu.uuid,
                int(gpu.total_bytes * config.cuda_memory_fraction) // CUDA_SEGMENT_ALIGNMENT_BYTES * CUDA_SEGMENT_ALIGNMENT_BYTES,
                CUDA_SEGMENT_ALIGNMENT_BYTES,
                CUDA_MIN_SEGMENT_BYTES,
            )
            for gpu in gpus
        )
        return DevicePlan(specs, {gpu.index: gpu.uuid for gpu in gpus})
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4 * KiB
    capacity = config.host_capacity_bytes // page * page
    return DevicePlan((DeviceSpec(HOST_DEVICE_ID, capacity, page),), {})


def pool_specs(config: BrokerConfig, devices: DevicePlan) -> list[PoolSpec]:
    """Resolve each configured pool's device names against the devices served.

    Raises ``ConfigError`` listing every pool's problem (an unknown or invisible device,
    a ``min_bytes`` above what the pool's devices hold), each under ``pools[i].<key>``."""
    known = [d.device_id for d in devices.specs]
    capacity = {d.device_id: d.capacity_bytes for d in devices.specs}
    specs = []
    problems: list[tuple[str, str]] = []
    for index, pool in enumerate(config.pools):
        resolved: list[str] = []
        for name in pool.devices:
            if name == ALL_DEVICES:
                resolved.extend(d for d in known if d not in resolved)
                continue
            if name.startswith("cuda:") and name[5:].isdigit():
                uuid = devices.gpu_index_to_uuid.get(int(name[5:]))
                if uuid is None:
                    problems.append((f"pools[{index}].devices", f"{name} is not a visible GPU"))
                    continue
                name = uuid
            if name not in known:
                problems.append((f"pools[{index}].devices", f"unknown device {name!r} (served: {', '.join(known)})"))
                continue
            if name not in resolved:
                resolved.append(name)
        held = sum(capacity[d] for d in resolved)
        if resolved and pool.min_bytes > held:
            problems.append((
                f"pools[{index}].min_bytes",
                f"{amount(pool.min_bytes)} is more than the pool's devices hold ({amount(held)})",
            ))  # fmt: skip
        try:
            specs.append(
                PoolSpec(
                    name=pool.name, devices=tuple(resolved), min_bytes=pool.min_bytes,
                    max_bytes=pool.max_bytes, priority=pool.priority,
                    eviction_policy=pool.eviction_policy, gc_threshold=pool.gc_threshold,
                    block_bytes=pool.block_bytes, segment_bytes=pool.segment_bytes,
                    default_cache_bytes=pool.default_cache_bytes, placement=pool.placement,
                    scrub=pool.scrub, offload=pool.offload,
                )
            )
        except InvalidArgument as err:
            # The core names the field "pools.<name>.<key>"; the operator's file says pools[i].
            key = err.field.removeprefix(f"pools.{pool.name}.") if err.field.startswith("pools.") else err.field
            message = str(err).removeprefix(f"{err.field}: ")
            if not (resolved == [] and key == "devices"):  # already reported above
                problems.append((f"pools[{index}].{key}", message))
    if problems:
        raise ConfigError.of(problems)
    return specs


def paged_specs(config: BrokerConfig) -> dict[str, PagedPoolSpec]:
    """The paged pools (``[pools.kv]``) with their arenas' block counts."""
    return {
        p.name: PagedPoolSpec(p.name, p.kv.layout, p.kv.arena_blocks(p.max_bytes, p.min_bytes), p.kv.prefault)
        for p in config.pools if p.kv is not None
    }  # fmt: skip


async def _create_arenas(paged: PagedPools, config: BrokerConfig) -> None:
    """Allocate every paged pool's arena before serving; one that does not fit stops the
    start with a message under the pool's key (``pools[i].kv``)."""
    index = {p.name: i for i, p in enumerate(config.pools)}
    for pool in paged.specs:
        try:
            await paged.create_arena(pool)
        except BrokerError as err:
            raise ConfigError(f"pools[{index[pool]}].kv", f"the arena of paged pool {pool!r} cannot be allocated: {err}") from None


def build_memories(devices: DevicePlan, instance_id: str, config: BrokerConfig) -> dict[str, SegmentMemory]:
    memories: dict[str, SegmentMemory] = {}
    for spec in devices.specs:
        if spec.device_id == HOST_DEVICE_ID:
            from kvbroker.memory.host import HostMemory, remove_stale_segments

            stale = remove_stale_segments(config.shm_dir, instance_id=instance_id)
            if stale:
                log.warning("removed %d shm objects left by a dead broker: %s", len(stale), ", ".join(stale))
            memories[spec.device_id] = HostMemory(instance_id, shm_dir=config.shm_dir, copy_threads=config.copy_threads)
        else:
            from kvbroker.memory.cuda import CudaMemory

            memories[spec.device_id] = CudaMemory(spec.device_id)
    return memories


def _clear_stale_socket(path: str) -> None:
    """Remove a Unix socket file that no process listens on (left by a crash)."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
    except OSError:
        pass
    else:
        raise ConfigError("server.unix_socket", f"{path} is in use by another process")
    finally:
        probe.close()


def is_loopback(listen: str) -> bool:
    """Whether a ``host:port`` listens only on this machine."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: BrokerConfig) -> None:
    """Refuse to serve every tenant's memory to the network without authorization, and
    say at start what protects the daemon.

    Raises ``ConfigError`` for a non-loopback TCP listener with authorization off, unless
    ``allow_unauthenticated_listen`` says it is wanted."""
    remote = bool(config.listen) and not is_loopback(config.listen)
    if not config.auth.enabled:
        if remote and not config.allow_unauthenticated_listen:
            raise ConfigError(
                "--listen",
                f"{config.listen} is reachable from other hosts and authorization is off: anyone "
                "who reaches it could read and free every tenant's caches. Configure "
                "[[auth.principals]] (and TLS), listen on 127.0.0.1, or pass "
                "--allow-unauthenticated-listen if the network is trusted",
            )
        log.warning(
            "authorization is off: every caller on the Unix socket%s may use every pool "
            "(configure [[auth.principals]] to restrict who may do what)",
            "" if not config.listen else (" and on " + config.listen),
        )
    else:
        log.info("authorization on: %d principal(s): %s", len(config.auth.principals),
                 ", ".join(p.name for p in config.auth.principals))  # fmt: skip
        if remote and not config.tls_cert:
            log.warning("bearer tokens travel in clear text on %s: configure --tls-cert/--tls-key", config.listen)


async def restore_persistent_pools(config: BrokerConfig, engine: Engine, observer: object) -> Persistence | None:
    """Restore the persistent pools' caches from the newest checkpoint that passes its
    checks (before serving); None when no pool is persistent."""
    pools = frozenset(p.name for p in config.pools if p.persistent)
    if not pools:
        return None
    from kvbroker.persistence import Store

    try:
        store = Store(config.persistence_dir, config.persistence_max_bytes or None)
    except OSError as err:
        raise ConfigError("persistence.dir", f"cannot create {config.persistence_dir}: {err.strerror or err}") from None
    persistence = engine.persist(
        store, pools, restore_grace_seconds=config.restore_grace_seconds,
        observer=observer if hasattr(observer, "checkpoint_finished") else None,
    )  # fmt: skip
    await persistence.restore()
    return persistence


async def checkpoint_at_exit(persistence: Persistence, grace_seconds: float) -> None:
    """The SIGTERM checkpoint: within ``grace_seconds``, else abandoned between two caches
    (the previous generation stays current). Failures are logged and counted, not raised."""
    loop = asyncio.get_running_loop()
    try:
        await persistence.checkpoint("shutdown", deadline=loop.time() + grace_seconds)
    except Exception:  # noqa: BLE001 - Persistence.checkpoint logged and counted it
        pass


async def serve(config: BrokerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT (or until the task is cancelled)."""
    check_exposure(config)
    devices = plan_devices(config)
    pools = pool_specs(config, devices)
    instance_id = secrets.token_hex(4)
    try:
        telemetry = Telemetry.create(
            instance_id=instance_id, pools=tuple(p.name for p in pools),
            metrics_listen=config.metrics_listen, environ=os.environ,
            methods=tuple(m.name for m in SERVICE.methods),
        )  # fmt: skip
    except ValueError as err:  # an unsupported OTEL_* value; the message starts with it
        key, _, message = str(err).partition(": ")
        raise ConfigError(key, message) from None
    budgets = {"host": config.offload_host_max_bytes, "disk": config.offload_disk_max_bytes}
    broker = Broker(devices.specs, pools, id_prefix=instance_id, offload_budgets=budgets)
    memories = build_memories(devices, instance_id, config)
    settings = EngineSettings(
        lease_seconds=config.lease_seconds,
        segment_idle_seconds=config.segment_idle_seconds,
        tick_seconds=min(0.25, config.lease_seconds / 4),
    )
    engine = Engine(broker, memories, instance_id, settings, observer=telemetry.observer)
    if any("disk" in p.offload for p in pools):
        offload_dir = os.path.join(config.persistence_dir, OFFLOAD_SUBDIR)
        try:
            engine.offload.use_disk(offload_dir)
        except OSError as err:
            raise ConfigError("persistence.dir", f"cannot create {offload_dir}: {err.strerror or err}") from None
    persistence: Persistence | None = None
    paged = PagedPools(engine, paged_specs(config))
    server: BrokerServer | None = None
    peers = PeerRegistry()
    handshake = PeerHandshakeServer(config.unix_socket + PEER_SOCKET_SUFFIX, peers) if config.unix_socket else None
    tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    try:
        persistence = await restore_persistent_pools(config, engine, telemetry.observer)
        if config.unix_socket:
            _clear_stale_socket(config.unix_socket)
        server = await create_server(
            engine, listen=config.listen or None, unix_socket=config.unix_socket or None,
            interceptors=telemetry.interceptors, policy=config.auth, peers=peers, tls=tls, paged=paged,
            recent_errors=config.recent_errors,
        )  # fmt: skip
        await _create_arenas(paged, config)
        if handshake is not None:
            await handshake.start()
        await telemetry.start(engine)
        await server.start()
        engine.start()
        if persistence is not None:
            persistence.start_periodic(config.checkpoint_interval_seconds)
        telemetry.serving = True
        if config.unix_socket:
            os.chmod(config.unix_socket, 0o660)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        scheme = "tcp" if tls is None else ("tcp+mtls" if config.tls_client_ca else "tcp+tls")
        where = [f"{scheme} {config.listen.rsplit(':', 1)[0]}:{server.tcp_port}"] if config.listen else []
        where += [f"unix {config.unix_socket}"] if config.unix_socket else []
        log.info(
            "kvbroker %s serving on %s; instance %s; devices %s; pools %s",
            __version__, ", ".join(where), instance_id,
            ", ".join(f"{d.device_id} ({d.capacity_bytes / 2**30:.2f} GiB)" for d in devices.specs),
            ", ".join(p.name for p in pools),
        )
        # Everything built so far lives as long as the daemon: move it out of the
        # collector's generations so collections on the request path stay short.
        gc.freeze()
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down: NOT_SERVING, %.1f s grace for in-flight calls", config.grace_seconds)
        telemetry.serving = False
        await server.enter_shutdown()
        if persistence is not None:
            await checkpoint_at_exit(persistence, config.grace_seconds)
        await engine.shutting_down()
        await server.stop(config.grace_seconds)
    finally:
        if handshake is not None:
            await handshake.stop()
        await telemetry.stop()
        if persistence is not None:
            await persistence.stop()
        await engine.close()
        if config.unix_socket and server is not None:
            try:
                os.unlink(config.unix_socket)
            except FileNotFoundError:
                pass
        log.info("stopped; all segments freed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvbroker serve",
        description="Serve KV-cache memory over gRPC (every visible GPU, else the host device).",
    )
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--listen", help="TCP address host:port (default 127.0.0.1:50051; '' disables)")
    parser.add_argument("--unix-socket", help="Unix socket path (default /tmp/kvbroker.sock; '' disables)")
    parser.add_argument("--devices", choices=("auto", "host", "cuda"), help="which devices to serve")
    parser.add_argument("--host-capacity", help="bytes of host memory to serve, e.g. 2GiB")
    parser.add_argument("--shm-dir", help="where host segments live (default /dev/shm)")
    parser.add_argument("--copy-threads", help="threads copying one large range of a host compaction (0: automatic)")
    parser.add_argument("--grace-seconds", type=float, help="grace period for in-flight calls at shutdown")
    parser.add_argument("--lease-seconds", type=float, help="a session without a call or heartbeat this long is ended")
    parser.add_argument("--segment-idle-seconds", type=float, help="an empty segment this idle goes back to the device")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--recent-errors", type=int, help="failed calls kept for `kvbroker stats` (default 100)")
    parser.add_argument("--metrics-listen", help="Prometheus /metrics address host:port (default 127.0.0.1:9464; '' disables)")
    parser.add_argument("--tls-cert", help="PEM certificate chain for the TCP listener (TLS)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates that chain to it (mutual TLS)")
    parser.add_argument("--allow-unauthenticated-listen", action="store_true", default=None,
                        help="serve a non-loopback --listen address with authorization off (a trusted network only)")
    parser.add_argument("--persistence-dir", help="where persistent pools' checkpoints live ([persistence] dir)")
    parser.add_argument("--checkpoint-interval-seconds", type=float,
                        help="seconds between periodic checkpoints (default 300; 0: only at SIGTERM and on demand)")
    parser.add_argument("--offload-host-max-bytes", help="bytes of host memory offloaded caches may take ([persistence] host_max_bytes)")
    parser.add_argument("--offload-disk-max-bytes", help="bytes of disk offloaded caches may take ([persistence] disk_max_bytes)")
    parser.add_argument("--version", action="version", version=f"kvbroker {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kvbroker serve``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        overrides = {
            "listen": args.listen,
            "unix_socket": args.unix_socket,
            "device_kind": args.devices,
            "host_capacity_bytes": args.host_capacity,
            "shm_dir": args.shm_dir,
            "copy_threads": args.copy_threads,
            "grace_seconds": args.grace_seconds,
            "lease_seconds": args.lease_seconds,
            "segment_idle_seconds": args.segment_idle_seconds,
            "recent_errors": args.recent_errors,
            "log_level": args.log_level,
            "metrics_listen": args.metrics_listen,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca,
            "allow_unauthenticated_listen": args.allow_unauthenticated_listen,
            "persistence_dir": args.persistence_dir,
            "checkpoint_interval_seconds": args.checkpoint_interval_seconds,
            "offload_host_max_bytes": args.offload_host_max_bytes,
            "offload_disk_max_bytes": args.offload_disk_max_bytes,
        }
        config = load_config(path=args.config, environ=os.environ, overrides=overrides)
    except ConfigError as err:
        return _config_error(err)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(config))
    except ConfigError as err:
        return _config_error(err)
    except RuntimeError as err:
        print(f"kvbroker: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


def _config_error(err: ConfigError) -> int:
    """Print every problem of ``err``, one per line, each with its key; return 2."""
    if len(err.problems) == 1:
        print(f"kvbroker: configuration error: {err}", file=sys.stderr)
    else:
        lines = "".join(f"\n  {key}: {message}" for key, message in err.problems)
        print(f"kvbroker: {len(err.problems)} configuration errors:{lines}", file=sys.stderr)
    return 2
