"""The ``[persistence]`` section and the pools' ``persistent`` key: their tables for
``kvbroker.config``'s loader (TOML, then ``KVBROKER_*`` variables, then flags, as every
other key) and the rules between them.

Parsing only; ``kvbroker.config`` owns the loader and calls ``problems`` with the built
configuration. Keys:

- ``dir``: where checkpoints live; required when a pool is ``persistent``.
- ``max_bytes``: the most the directory may hold (the kept generation plus the one
  being written); 0 means no limit but the disk's.
- ``checkpoint_interval_seconds`` (300, the seed's): 0 turns periodic checkpoints off
  (SIGTERM and on-demand checkpoints still run).
- ``restore_grace_seconds`` (60): how long restored caches are held by the broker
  itself after a start, so that their clients re-attach before background
  reclamation may take the idle retained ones (see ``kvbroker.engine.persistence``).

The offload tier (``kvbroker.core.offload``): a pool's ``offload`` key (``"host"``,
``"disk"`` or ``["host", "disk"]``: host first, overflowing to disk) and two budgets:

- ``host_max_bytes``: the daemon's private memory that offloaded caches may take;
  required (> 0) when a pool offloads to ``"host"``.
- ``disk_max_bytes``: the bytes of offloaded caches' files under ``<dir>/offload``
  (their own sub-directory, beside the checkpoints and outside ``max_bytes``, which
  bounds checkpoints alone); required (> 0), with ``dir``, when a pool offloads to
  ``"disk"``. The directory is emptied at every start: an offloaded cache does not
  outlive its daemon (checkpoints are what survive a restart).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

#: ``[persistence]`` keys and their kinds (``kvbroker.config``'s: "size", float, str).
SECTION: dict[str, Any] = {
    "dir": str, "max_bytes": "size", "checkpoint_interval_seconds": float, "restore_grace_seconds": float,
    "host_max_bytes": "size", "disk_max_bytes": "size",
}
#: TOML key -> ``BrokerConfig`` field.
FIELDS = {
    "dir": "persistence_dir", "max_bytes": "persistence_max_bytes",
    "checkpoint_interval_seconds": "checkpoint_interval_seconds", "restore_grace_seconds": "restore_grace_seconds",
    "host_max_bytes": "offload_host_max_bytes", "disk_max_bytes": "offload_disk_max_bytes",
}
#: ``KVBROKER_*`` variables -> (field, kind).
ENV = {
    "KVBROKER_PERSISTENCE_DIR": ("persistence_dir", str),
    "KVBROKER_PERSISTENCE_MAX_BYTES": ("persistence_max_bytes", "size"),
    "KVBROKER_CHECKPOINT_INTERVAL_SECONDS": ("checkpoint_interval_seconds", float),
    "KVBROKER_RESTORE_GRACE_SECONDS": ("restore_grace_seconds", float),
    "KVBROKER_OFFLOAD_HOST_MAX_BYTES": ("offload_host_max_bytes", "size"),
    "KVBROKER_OFFLOAD_DISK_MAX_BYTES": ("offload_disk_max_bytes", "size"),
}
#: Pool keys added by persistence, and their kinds.
POOL_KEYS: dict[str, Any] = {"persistent": bool, "offload": object}
#: The offload tiers a pool may name (``kvbroker.core.types.OFFLOAD_TIERS``).
TIERS = ("host", "disk")
#: Where the disk tier's files live, under ``dir``.
OFFLOAD_SUBDIR = "offload"


def offload_tiers(value: Any) -> tuple[tuple[str, ...], str]:
    """A pool's ``offload`` value as a tuple of tiers, and "" or why it is wrong."""
    tiers = [value] if isinstance(value, str) else value
    if not isinstance(tiers, list) or not tiers or not all(isinstance(t, str) and t in TIERS for t in tiers):
        return (), f'must be "host", "disk" or ["host", "disk"], got {value!r}'
    if len(set(tiers)) != len(tiers):
        return (), f"names a tier twice: {value!r}"
    return tuple(tiers), ""
DEFAULT_INTERVAL_SECONDS = 300.0
DEFAULT_RESTORE_GRACE_SECONDS = 60.0


def problems(config: Any, key: Callable[[str], str], skip: set[str]) -> Iterable[tuple[str, str]]:
    """The rules of the persistence keys over a built ``BrokerConfig``: ``(key, message)``
    for each broken one. ``key(field)`` names the field as the operator set it."""
    toml = {f: f"persistence.{k}" for k, f in FIELDS.items()}

    def named(field: str) -> str:  # a key nobody set is named as the file names it
        given = key(field)
        return toml[field] if given == field else given

    for name in ("checkpoint_interval_seconds", "restore_grace_seconds"):
        value = getattr(config, name)
        if name not in skip and not (0 <= value < math.inf):
            yield named(name), f"must be a finite number of seconds >= 0, got {value}"
    persistent = [p.name for p in config.pools if p.persistent]
    if persistent and not config.persistence_dir and "persistence_dir" not in skip:
        yield (
            named("persistence_dir"),
            f"pools {', '.join(persistent)} are persistent: set persistence.dir (or KVBROKER_PERSISTENCE_DIR)",
        )
    for tier, field in (("host", "offload_host_max_bytes"), ("disk", "offload_disk_max_bytes")):
        pools = [p.name for p in config.pools if tier in p.offload]
        if pools and not getattr(config, field) and field not in skip:
            yield named(field), f"pools {', '.join(pools)} offload to the {tier} tier: set its budget (> 0 bytes)"
    disk = [p.name for p in config.pools if "disk" in p.offload]
    if disk and not config.persistence_dir and "persistence_dir" not in skip and not persistent:
        yield named("persistence_dir"), f"pools {', '.join(disk)} offload to disk: set persistence.dir (files go to its offload/)"
