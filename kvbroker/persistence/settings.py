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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

#: ``[persistence]`` keys and their kinds (``kvbroker.config``'s: "size", float, str).
SECTION: dict[str, Any] = {
    "dir": str, "max_bytes": "size", "checkpoint_interval_seconds": float, "restore_grace_seconds": float,
}
#: TOML key -> ``BrokerConfig`` field.
FIELDS = {
    "dir": "persistence_dir", "max_bytes": "persistence_max_bytes",
    "checkpoint_interval_seconds": "checkpoint_interval_seconds", "restore_grace_seconds": "restore_grace_seconds",
}
#: ``KVBROKER_*`` variables -> (field, kind).
ENV = {
    "KVBROKER_PERSISTENCE_DIR": ("persistence_dir", str),
    "KVBROKER_PERSISTENCE_MAX_BYTES": ("persistence_max_bytes", "size"),
    "KVBROKER_CHECKPOINT_INTERVAL_SECONDS": ("checkpoint_interval_seconds", float),
    "KVBROKER_RESTORE_GRACE_SECONDS": ("restore_grace_seconds", float),
}
#: Pool keys added by persistence, and their kinds.
POOL_KEYS: dict[str, Any] = {"persistent": bool}
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
