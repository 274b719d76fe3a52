"""Daemon configuration: defaults, then a TOML file, then ``KVBROKER_*`` variables, then
command-line flags, each overriding the one before.

Parsing only: no side effects, nothing opened or bound. Every problem found is reported
at once, in one ``ConfigError`` that lists each with the key at fault first
(``pools[1].max_bytes``, ``KVBROKER_HOST_CAPACITY``, ``--listen``), so one failed start
says everything to fix. Unknown keys are errors too: a typo must not silently fall back
to a default. Every number is checked, not only parsed: ports are 0 to 65535 (a socket
API takes a port modulo 65536, so 99999 would quietly serve on 34463), times are finite
and not negative, sizes are whole numbers of bytes.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from kvbroker.core.eviction import POLICIES
from kvbroker.core.types import GiB, MiB, Placement, pool_problems
from kvbroker.persistence import settings as persistence
from kvbroker.pagedconfig import KvPoolConfig, parse_kv
from kvbroker.security import AuthPolicy, parse_auth
from kvbroker.wire import SIZE_UNITS

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_UNIX_SOCKET = "/tmp/kvbroker.sock"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEVICE_KINDS = ("auto", "host", "cuda")
ALL_DEVICES = "*"

#: Size units, case-insensitive: ``K``/``KB``... are decimal (powers of 1000, as disk
#: and network vendors use them); ``Ki``/``KiB``... binary (powers of 1024, as memory is
#: sized). ``"2G"`` is 2,000,000,000 bytes; ``"2Gi"`` and ``"2GiB"`` are 2,147,483,648.
_UNITS = SIZE_UNITS  # one table for the daemon's configuration and the client (kvbroker.wire)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
#: The largest size accepted: what the wire's int64 byte counts can carry.
MAX_SIZE = 2**63 - 1
_ADDRESS = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d+)")
MAX_PORT = 65535


class ConfigError(ValueError):
    """The configuration is invalid.

    Attributes:
        problems: every ``(key, message)`` found, in the order found.
        key: the first problem's key.

    ``str()`` is ``"key: message"`` for one problem, one such line per problem for more.
    """

    def __init__(self, key: str, message: str, *, problems: list[tuple[str, str]] | None = None) -> None:
        self.problems = tuple(problems) if problems else ((key, message),)
        self.key = self.problems[0][0]
        super().__init__("\n".join(f"{k}: {m}" for k, m in self.problems))

    @classmethod
    def of(cls, problems: list[tuple[str, str]]) -> ConfigError:
        """One error listing ``problems`` (at least one)."""
        return cls(*problems[0], problems=problems)


def parse_size(key: str, value: Any) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2Gi"``, ``"1.5GB"`` (see
    ``_UNITS``); a whole number of bytes from 0 to ``MAX_SIZE``."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_SIZE:
            raise ConfigError(key, f"must be between 0 and {MAX_SIZE} bytes, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match and match.group(2).lower() in _UNITS:
            try:
                exact = Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
            except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
                exact = Decimal(-1)
            if exact != exact.to_integral_value():
                raise ConfigError(key, f"{value!r} is {exact} bytes, not a whole number of bytes")
            if exact > MAX_SIZE:
                raise ConfigError(key, f"{value!r} is more than {MAX_SIZE} bytes")
            return int(exact)
    raise ConfigError(
        key, f"expected a size such as 1073741824, \"512MiB\", \"2Gi\" or \"1.5GB\", got {value!r}"
    )


@dataclass(frozen=True)
class PoolConfig:
    """A pool as configured; devices are resolved against the discovered devices by the
    daemon (``"*"`` means every device; ``"cuda:N"`` a GPU by index; else an id).

    ``scrub`` (default true) zeroes every reused byte range before a new cache gets it,
    so no tenant ever reads bytes another tenant released. It costs one
    memset per allocation that reuses freed bytes (in a device thread, at memory
    bandwidth). TURN IT OFF ONLY FOR SINGLE-TENANT DEPLOYMENTS, where every client of
    the pool may read every other client's KV caches anyway: with ``scrub = false`` a
    new cache starts with whatever the last cache at that place held.
    """

    name: str
    devices: tuple[str, ...] = (ALL_DEVICES,)
    min_bytes: int = 0
    max_bytes: int | None = None
    priority: int = 0
    eviction_policy: str = "lru"
    gc_threshold: float = 0.9
    block_bytes: int = 64 * 1024
    segment_bytes: int = 256 * MiB
    default_cache_bytes: int = 0
    placement: Placement = Placement.LEAST_LOADED
    #: Zero reused bytes before handing them out. Off only for single-tenant deployments.
    scrub: bool = True
    #: Checkpoint this pool's caches and restore them at start (``[persistence]``).
    persistent: bool = False
    #: A paged KV pool's layout and budget (``[pools.kv]``, ``kvbroker.pagedconfig``).
    kv: KvPoolConfig | None = None
    #: Offload tiers ("host", "disk", both) instead of eviction (``[persistence]``).
    offload: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrokerConfig:
    listen: str = DEFAULT_LISTEN
    unix_socket: str = DEFAULT_UNIX_SOCKET
    device_kind: str = "auto"
    host_capacity_bytes: int = 1 * GiB
    cuda_memory_fraction: float = 0.9
    shm_dir: str = "/dev/shm"
    #: Threads that copy one large range of a host compaction at once (0: the cores
    #: available, at most 8; ``kvbroker.memory.parallel``).
    copy_threads: int = 0
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    lease_seconds: float = 10.0
    segment_idle_seconds: float = 30.0
    #: Failed calls kept for ``kvbroker stats`` (``kvbroker/server/errorlog.py``).
    recent_errors: int = 100
    #: Prometheus ``/metrics`` address (host:port); "" serves no metrics.
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    pools: tuple[PoolConfig, ...] = field(default_factory=lambda: (PoolConfig("default"),))
    #: Principals and their rights (``[auth]``); no principal means authorization off.
    auth: AuthPolicy = field(default_factory=AuthPolicy)
    #: TLS for the TCP listener: certificate chain and key (PEM files), and the CA that
    #: client certificates must chain to (mutual TLS; "" accepts clients without one).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    #: Serve a non-loopback TCP address with authorization off. Off by default: anyone who
    #: reaches the port could then read and free every tenant's caches.
    allow_unauthenticated_listen: bool = False
    #: ``[persistence]`` (``kvbroker.persistence.settings``); max_bytes 0: the disk's limit.
    persistence_dir: str = ""
    persistence_max_bytes: int = 0
    checkpoint_interval_seconds: float = persistence.DEFAULT_INTERVAL_SECONDS
    restore_grace_seconds: float = persistence.DEFAULT_RESTORE_GRACE_SECONDS
    offload_host_max_bytes: int = 0
    offload_disk_max_bytes: int = 0


_POOL_KEYS = {
    "name": str, "devices": list, "min_bytes": "size", "max_bytes": "size", "priority": int,
    "eviction_policy": str, "gc_threshold": float, "block_bytes": "size", "segment_bytes": "size",
    "default_cache_bytes": "size", "placement": str, "scrub": bool, "kv": dict, **persistence.POOL_KEYS,
}
_SECTIONS = {
    "server": {"listen": str, "unix_socket": str, "grace_seconds": float, "log_level": str, "recent_errors": int},
    "devices": {"kind": str, "host_capacity": "size", "cuda_memory_fraction": float, "shm_dir": str,
                "copy_threads": int},
    "telemetry": {"metrics_listen": str},
    "sessions": {"lease_seconds": float, "segment_idle_seconds": float},
    "tls": {"cert": str, "key": str, "client_ca": str},
    "persistence": persistence.SECTION,
}
_ENV = {
    "KVBROKER_LISTEN": ("listen", str),
    "KVBROKER_UNIX_SOCKET": ("unix_socket", str),
    "KVBROKER_DEVICES": ("device_kind", str),
    "KVBROKER_HOST_CAPACITY": ("host_capacity_bytes", "size"),
    "KVBROKER_CUDA_MEMORY_FRACTION": ("cuda_memory_fraction", float),
    "KVBROKER_SHM_DIR": ("shm_dir", str),
    "KVBROKER_COPY_THREADS": ("copy_threads", int),
    "KVBROKER_GRACE_SECONDS": ("grace_seconds", float),
    "KVBROKER_LOG_LEVEL": ("log_level", str),
    "KVBROKER_METRICS_LISTEN": ("metrics_listen", str),
    "KVBROKER_LEASE_SECONDS": ("lease_seconds", float),
    "KVBROKER_SEGMENT_IDLE_SECONDS": ("segment_idle_seconds", float),
    "KVBROKER_RECENT_ERRORS": ("recent_errors", int),
    "KVBROKER_TLS_CERT": ("tls_cert", str),
    "KVBROKER_TLS_KEY": ("tls_key", str),
    "KVBROKER_TLS_CLIENT_CA": ("tls_client_ca", str),
    **persistence.ENV,
}
_SECTION_FIELD = {
    ("devices", "kind"): "device_kind", ("devices", "host_capacity"): "host_capacity_bytes",
    ("tls", "cert"): "tls_cert", ("tls", "key"): "tls_key", ("tls", "client_ca"): "tls_client_ca",
    **{("persistence", k): f for k, f in persistence.FIELDS.items()},
}


#: Flags whose name is not ``--`` + the field's name with dashes.
_FLAG = {"device_kind": "--devices", "host_capacity_bytes": "--host-capacity"}
#: How a flag's value is typed (argparse gives strings, or floats for ``type=float``).
_FIELD_KIND: dict[str, Any] = {field_name: kind for field_name, kind in _ENV.values()} | {
    "allow_unauthenticated_listen": bool,
}


def _typed(key: str, kind: Any, value: Any) -> Any:
    if kind == "size":
        return parse_size(key, value)
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(key, f"expected {kind.__name__}, got {value!r}")
    return value


class _Problems:
    """Collects every problem of one load; ``typed`` records a bad value instead of
    raising, so parsing goes on and the next problem is found too. ``ordered`` lists them
    in the order their keys were read (the file's order, then variables, then flags)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._read: dict[str, int] = {}

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))

    def ordered(self) -> list[tuple[str, str]]:
        return sorted(self.items, key=lambda item: self._read.get(item[0], len(self._read)))

    def typed(self, key: str, kind: Any, value: Any) -> tuple[bool, Any]:
        self._read.setdefault(key, len(self._read))
        try:
            return True, _typed(key, kind, value)
        except ConfigError as err:
            self.items.extend(err.problems)
            return False, None


def _pool(index: int, table: Any, problems: _Problems) -> PoolConfig | None:
    """The pool of ``[[pools]]`` table ``index``, or None when it has problems (each
    recorded under ``pools[index].<key>``)."""
    where = f"pools[{index}]"
    if not isinstance(table, dict):
        problems.add(where, "expected a table")
        return None
    before = len(problems.items)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _POOL_KEYS:
            problems.add(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(_POOL_KEYS))})")
            continue
        ok, typed = problems.typed(f"{where}.{key}", _POOL_KEYS[key], value)
        if ok:
            values[key] = typed
    if "name" not in table:
        problems.add(f"{where}.name", "is required")
    if "devices" in values:
        devices = values["devices"]
        if not devices or not all(isinstance(d, str) and d for d in devices):
            problems.add(f"{where}.devices", "expected a non-empty list of device names")
            del values["devices"]
        else:
            values["devices"] = tuple(devices)
    if "offload" in values:
        values["offload"], why = persistence.offload_tiers(values["offload"])
        if why:
            problems.add(f"{where}.offload", why)
    if "placement" in values:
        try:
            values["placement"] = Placement(values["placement"])
        except ValueError:
            problems.add(f"{where}.placement", f"must be one of {', '.join(p.value for p in Placement)}")
    policy = values.get("eviction_policy", "lru")
    if policy not in POLICIES:
        problems.add(
            f"{where}.eviction_policy", f"unknown policy {policy!r}; choose one of: {', '.join(sorted(POLICIES))}"
        )
    # The numbers' rules are the core's (kvbroker.core.types.pool_problems): checked only
    # for keys that parsed, so a bad value is reported once.
    checked = {f.name: f.default for f in fields(PoolConfig)} | values
    reported = {key.rsplit(".", 1)[-1] for key, _ in problems.items[before:]}
    for key, message in pool_problems(checked):
        if key not in reported:
            problems.add(f"{where}.{key}", message)
    if "kv" in values and len(problems.items) == before:
        values["kv"], kv_problems = parse_kv(where, values["kv"], max_bytes=values.get("max_bytes"),
                                             min_bytes=values.get("min_bytes", 0))  # fmt: skip
        problems.items.extend(kv_problems)
        if values["kv"] is not None and "segment_bytes" not in values:  # one segment: the arena
            values["segment_bytes"] = values["kv"].arena_segment_bytes(values, PoolConfig.block_bytes)
    if len(problems.items) > before:
        return None
    return PoolConfig(**values)


def _check_address(problems: _Problems, key: str, value: str) -> None:
    match = _ADDRESS.fullmatch(value)
    if not match:
        problems.add(key, f"expected host:port (port 0 to {MAX_PORT}), got {value!r}")
    elif int(match.group(2)) > MAX_PORT:
        problems.add(key, f"port {int(match.group(2))} is out of range: ports are 0 to {MAX_PORT} (in {value!r})")


def _validate(config: BrokerConfig, key_of: Mapping[str, str], skip: set[str], problems: _Problems) -> None:
    """Check every value and every rule between values, recording each problem. Fields in
    ``skip`` had a bad value (already recorded): the rules that read them are skipped."""

    def key(name: str) -> str:
        return key_of.get(name, name)

    def check(name: str, ok: bool, message: str) -> None:
        if name not in skip and not ok:
            problems.add(key(name), message)

    c = config
    check("device_kind", c.device_kind in DEVICE_KINDS,
          f"must be one of {', '.join(DEVICE_KINDS)}, got {c.device_kind!r}")  # fmt: skip
    check("host_capacity_bytes", c.host_capacity_bytes >= 4096, f"must be at least 4096 bytes, got {c.host_capacity_bytes}")
    check("cuda_memory_fraction", 0 < c.cuda_memory_fraction <= 1, f"must be in (0, 1], got {c.cuda_memory_fraction}")
    check("copy_threads", 0 <= c.copy_threads <= 64, f"must be 0 (automatic) to 64, got {c.copy_threads}")
    check("grace_seconds", 0 <= c.grace_seconds < math.inf, f"must be a finite number of seconds >= 0, got {c.grace_seconds}")
    check("lease_seconds", 0.1 <= c.lease_seconds <= 3600, f"must be in [0.1, 3600] seconds, got {c.lease_seconds}")
    check("segment_idle_seconds", 0 <= c.segment_idle_seconds < math.inf,
          f"must be a finite number of seconds >= 0, got {c.segment_idle_seconds}")  # fmt: skip
    check("recent_errors", 0 <= c.recent_errors <= 100_000, f"must be in [0, 100000], got {c.recent_errors}")
    check("log_level", c.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
          "must be one of DEBUG, INFO, WARNING, ERROR")  # fmt: skip
    if not {"listen", "unix_socket"} & skip:
        check("listen", bool(c.listen or c.unix_socket), "the daemon needs a TCP address or a Unix socket")
    for name in ("listen", "metrics_listen"):
        if name not in skip and getattr(c, name):
            _check_address(problems, key(name), getattr(c, name))
    if not {"tls_cert", "tls_key"} & skip and bool(c.tls_cert) != bool(c.tls_key):
        given, missing = ("tls_cert", "tls_key") if c.tls_cert else ("tls_key", "tls_cert")
        problems.add(key(given), f"TLS needs both a certificate and a key (set {missing} too)")
    if not {"tls_client_ca", "tls_cert"} & skip:
        check("tls_client_ca", not c.tls_client_ca or bool(c.tls_cert),
              "mutual TLS needs the server's own certificate and key too")  # fmt: skip
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(c, name)
        check(name, not path or os.access(path, os.R_OK), f"cannot read {path}")
    check("pools", bool(c.pools), "at least one pool is required")
    for problem in persistence.problems(c, key, skip):
        problems.add(*problem)


def load_config(
    *,
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> BrokerConfig:
    """Build the configuration from a TOML file, the environment and flag overrides.

    Args:
        path: a TOML file (``[server]``, ``[devices]``, ``[telemetry]``, ``[[pools]]``), or None.
        environ: the environment to read ``KVBROKER_*`` from.
        overrides: values from flags, keyed by ``BrokerConfig`` field name
            (``None`` values are ignored); strings are parsed as the environment's are.

    Raises:
        ConfigError: listing every problem, each under the key at fault.
    """
    problems = _Problems()
    values: dict[str, Any] = {}
    key_of: dict[str, str] = {}
    skip: set[str] = set()  # fields whose latest value was bad

    def put(field_name: str, key: str, kind: Any, value: Any) -> None:
        ok, typed = problems.typed(key, kind, value)
        key_of[field_name] = key
        if ok:
            values[field_name] = typed
            skip.discard(field_name)
        else:
            skip.add(field_name)

    if path:
        _read_file(path, environ, problems, values, put, skip)
    for env_key, (field_name, kind) in _ENV.items():
        if environ and env_key in environ:
            put(field_name, env_key, kind, environ[env_key])
    for field_name, value in (overrides or {}).items():
        if value is None:
            continue
        flag = _FLAG.get(field_name, "--" + field_name.replace("_", "-"))
        if field_name in _FIELD_KIND:
            put(field_name, flag, _FIELD_KIND[field_name], value)
        else:  # a value no flag or variable gives (a test's): taken as built
            values[field_name], key_of[field_name] = value, flag
    config = replace(BrokerConfig(), **{k: v for k, v in values.items() if k not in skip})
    _validate(config, key_of, skip, problems)
    if problems.items:
        raise ConfigError.of(problems.ordered())
    return config


def _read_file(
    path: str,
    environ: Mapping[str, str] | None,
    problems: _Problems,
    values: dict[str, Any],
    put: Callable[[str, str, Any, Any], None],
    skip: set[str],
) -> None:
    """The TOML file's values into ``values`` (through ``put``), its problems recorded."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        problems.add("--config", f"cannot read {path}: {err.strerror}")
        return
    except tomllib.TOMLDecodeError as err:
        problems.add(path, f"invalid TOML: {err}")
        return
    for section, table in data.items():
        if section == "auth":
            try:
                values["auth"] = parse_auth(table, environ if environ is not None else {})
            except ValueError as err:
                key, _, message = str(err).partition(": ")
                problems.add(key, message)
            continue
        if section == "pools":
            if not isinstance(table, list):
                problems.add("pools", "expected [[pools]] tables")
                skip.add("pools")
                continue
            pools = [_pool(i, t, problems) for i, t in enumerate(table)]
            _check_pool_names(table, problems)
            if all(p is not None for p in pools):
                values["pools"] = tuple(pools)
            else:
                skip.add("pools")
            continue
        known = _SECTIONS.get(section)
        if known is None or not isinstance(table, dict):
            problems.add(section, f"unknown section (known: auth, pools, {', '.join(_SECTIONS)})")
            continue
        for name, value in table.items():
            if name not in known:
                problems.add(f"{section}.{name}", f"unknown key (known: {', '.join(sorted(known))})")
                continue
            put(_SECTION_FIELD.get((section, name), name), f"{section}.{name}", known[name], value)


def _check_pool_names(tables: list[Any], problems: _Problems) -> None:
    seen: set[str] = set()
    for index, table in enumerate(tables):
        name = table.get("name") if isinstance(table, dict) else None
        if isinstance(name, str):
            if name in seen:
                problems.add(f"pools[{index}].name", f"pool {name!r} is defined twice")
            seen.add(name)
