"""Checkpoints of persistent pools' caches on disk: one safetensors file per cache, a
manifest of sizes and digests per generation, and a ``CURRENT`` pointer replaced
atomically (``store``); one cache's file (``cachefile``); the ``[persistence]``
configuration (``settings``).

Beside ``kvbroker.memory`` in the layers: it knows files and bytes, never the engine's
loop or the core's state; the engine (``kvbroker.engine.persistence``) decides what to
write and when.
"""

from kvbroker.persistence.cachefile import CacheMeta, CorruptFile
from kvbroker.persistence.store import (
    BudgetExceeded,
    CorruptGeneration,
    DiskFull,
    Generation,
    GenerationWriter,
    ManifestEntry,
    PersistenceError,
    Store,
)

__all__ = [
    "BudgetExceeded", "CacheMeta", "CorruptFile", "CorruptGeneration", "DiskFull", "Generation",
    "GenerationWriter", "ManifestEntry", "PersistenceError", "Store",
]
