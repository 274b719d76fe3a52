"""Daemon configuration: defaults, then a TOML file, then ``KVBROKER_*`` variables, then
command-line flags, each overriding the one before.

Parsing only: no side effects, nothing opened or bound. Every error is a
``ConfigError`` whose message starts with the key at fault (``pools[1].max_bytes``,
``KVBROKER_HOST_CAPACITY``, ``--listen``), so a bad start says exactly what to fix.
Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvbroker.core.eviction import POLICIES
from kvbroker.core.types import GiB, MiB, Placement
from kvbroker.security import AuthPolicy, parse_auth

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_UNIX_SOCKET = "/tmp/kvbroker.sock"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEVICE_KINDS = ("auto", "host", "cuda")
ALL_DEVICES = "*"

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with its key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def parse_size(key: str, value: Any) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ConfigError(key, f"expected a size such as 1073741824, \"512MiB\" or \"2GiB\", got {value!r}")


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


@dataclass(frozen=True)
class BrokerConfig:
    listen: str = DEFAULT_LISTEN
    unix_socket: str = DEFAULT_UNIX_SOCKET
    device_kind: str = "auto"
    host_capacity_bytes: int = 1 * GiB
    cuda_memory_fraction: float = 0.9
    shm_dir: str = "/dev/shm"
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    lease_seconds: float = 10.0
    segment_idle_seconds: float = 30.0
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


_POOL_KEYS = {
    "name": str, "devices": list, "min_bytes": "size", "max_bytes": "size", "priority": int,
    "eviction_policy": str, "gc_threshold": float, "block_bytes": "size", "segment_bytes": "size",
    "default_cache_bytes": "size", "placement": str, "scrub": bool,
}
_SECTIONS = {
    "server": {"listen": str, "unix_socket": str, "grace_seconds": float, "log_level": str},
    "devices": {"kind": str, "host_capacity": "size", "cuda_memory_fraction": float, "shm_dir": str},
    "telemetry": {"metrics_listen": str},
    "sessions": {"lease_seconds": float, "segment_idle_seconds": float},
    "tls": {"cert": str, "key": str, "client_ca": str},
}
_ENV = {
    "KVBROKER_LISTEN": ("listen", str),
    "KVBROKER_UNIX_SOCKET": ("unix_socket", str),
    "KVBROKER_DEVICES": ("device_kind", str),
    "KVBROKER_HOST_CAPACITY": ("host_capacity_bytes", "size"),
    "KVBROKER_CUDA_MEMORY_FRACTION": ("cuda_memory_fraction", float),
    "KVBROKER_SHM_DIR": ("shm_dir", str),
    "KVBROKER_GRACE_SECONDS": ("grace_seconds", float),
    "KVBROKER_LOG_LEVEL": ("log_level", str),
    "KVBROKER_METRICS_LISTEN": ("metrics_listen", str),
    "KVBROKER_LEASE_SECONDS": ("lease_seconds", float),
    "KVBROKER_SEGMENT_IDLE_SECONDS": ("segment_idle_seconds", float),
    "KVBROKER_TLS_CERT": ("tls_cert", str),
    "KVBROKER_TLS_KEY": ("tls_key", str),
    "KVBROKER_TLS_CLIENT_CA": ("tls_client_ca", str),
}
_SECTION_FIELD = {
    ("devices", "kind"): "device_kind", ("devices", "host_capacity"): "host_capacity_bytes",
    ("tls", "cert"): "tls_cert", ("tls", "key"): "tls_key", ("tls", "client_ca"): "tls_client_ca",
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
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(key, f"expected {kind.__name__}, got {value!r}")
    return value


def _pool(index: int, table: Any) -> PoolConfig:
    where = f"pools[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a table")
    for key in table:
        if key not in _POOL_KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(_POOL_KEYS))})")
    if "name" not in table:
        raise ConfigError(f"{where}.name", "is required")
    values = {key: _typed(f"{where}.{key}", _POOL_KEYS[key], v) for key, v in table.items()}
    if "devices" in values:
        devices = values["devices"]
        if not devices or not all(isinstance(d, str) and d for d in devices):
            raise ConfigError(f"{where}.devices", "expected a non-empty list of device names")
        values["devices"] = tuple(devices)
    if "placement" in values:
        try:
            values["placement"] = Placement(values["placement"])
        except ValueError:
            raise ConfigError(
                f"{where}.placement", f"must be one of {', '.join(p.value for p in Placement)}"
            ) from None
    policy = values.get("eviction_policy", "lru")
    if policy not in POLICIES:
        raise ConfigError(f"{where}.eviction_policy", f"unknown policy {policy!r}; choose one of: {', '.join(sorted(POLICIES))}")
    return PoolConfig(**values)


def _validate(config: BrokerConfig, key_of: Mapping[str, str]) -> BrokerConfig:
    def key(name: str) -> str:
        return key_of.get(name, name)

    if config.device_kind not in DEVICE_KINDS:
        raise ConfigError(key("device_kind"), f"must be one of {', '.join(DEVICE_KINDS)}, got {config.device_kind!r}")
    if config.host_capacity_bytes < 4096:
        raise ConfigError(key("host_capacity_bytes"), f"must be at least 4096 bytes, got {config.host_capacity_bytes}")
    if not 0 < config.cuda_memory_fraction <= 1:
        raise ConfigError(key("cuda_memory_fraction"), "must be in (0, 1]")
    if config.grace_seconds < 0:
        raise ConfigError(key("grace_seconds"), "must be >= 0")
    if not 0.1 <= config.lease_seconds <= 3600:
        raise ConfigError(key("lease_seconds"), f"must be in [0.1, 3600] seconds, got {config.lease_seconds}")
    if config.segment_idle_seconds < 0:
        raise ConfigError(key("segment_idle_seconds"), "must be >= 0")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(key("log_level"), "must be one of DEBUG, INFO, WARNING, ERROR")
    if not config.listen and not config.unix_socket:
        raise ConfigError(key("listen"), "the daemon needs a TCP address or a Unix socket")
    for name in ("listen", "metrics_listen"):
        value = getattr(config, name)
        if value and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}", value):
            raise ConfigError(key(name), f"expected host:port, got {value!r}")
    if bool(config.tls_cert) != bool(config.tls_key):
        given, missing = ("tls_cert", "tls_key") if config.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(key(given), f"TLS needs both a certificate and a key (set {missing} too)")
    if config.tls_client_ca and not config.tls_cert:
        raise ConfigError(key("tls_client_ca"), "mutual TLS needs the server's own certificate and key too")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(config, name)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(key(name), f"cannot read {path}")
    if not config.pools:
        raise ConfigError("pools", "at least one pool is required")
    seen: set[str] = set()
    for index, pool in enumerate(config.pools):
        if pool.name in seen:
            raise ConfigError(f"pools[{index}].name", f"pool {pool.name!r} is defined twice")
        seen.add(pool.name)
    return config


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
            (``None`` values are ignored).

    Raises:
        ConfigError: naming the key at fault.
    """
    config = BrokerConfig()
    key_of: dict[str, str] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as err:
            raise ConfigError("--config", f"cannot read {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(path, f"invalid TOML: {err}") from None
        values: dict[str, Any] = {}
        for section, table in data.items():
            if section == "auth":
                try:
                    values["auth"] = parse_auth(table, environ if environ is not None else {})
                except ValueError as err:
                    key, _, message = str(err).partition(": ")
                    raise ConfigError(key, message) from None
                continue
            if section == "pools":
                if not isinstance(table, list):
                    raise ConfigError("pools", "expected [[pools]] tables")
                values["pools"] = tuple(_pool(i, t) for i, t in enumerate(table))
                continue
            known = _SECTIONS.get(section)
            if known is None or not isinstance(table, dict):
                raise ConfigError(section, f"unknown section (known: auth, pools, {', '.join(_SECTIONS)})")
            for name, value in table.items():
                if name not in known:
                    raise ConfigError(f"{section}.{name}", f"unknown key (known: {', '.join(sorted(known))})")
                field_name = _SECTION_FIELD.get((section, name), name)
                values[field_name] = _typed(f"{section}.{name}", known[name], value)
                key_of[field_name] = f"{section}.{name}"
        config = replace(config, **values)
    for env_key, (field_name, kind) in _ENV.items():
        if environ and env_key in environ:
            config = replace(config, **{field_name: _typed(env_key, kind, environ[env_key])})
            key_of[field_name] = env_key
    for field_name, value in (overrides or {}).items():
        if value is not None:
            config = replace(config, **{field_name: value})
            key_of[field_name] = "--" + field_name.replace("_", "-")
    return _validate(config, key_of)
