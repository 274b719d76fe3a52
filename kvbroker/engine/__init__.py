"""The engine: the pure core plus the device memory, driven from one asyncio event loop.

``Engine`` (``kvbroker.engine.engine``) is what the server and the daemon call; the
other modules are its parts. See ``engine.py`` for the concurrency invariant.
"""

from kvbroker.engine.background import EngineSettings
from kvbroker.engine.engine import Engine
from kvbroker.engine.views import MAX_LISTED_MOVES, CachePage, DefragmentResult, EngineStatus, MoveView, SessionView
from kvbroker.engine.handles import CacheHandle
from kvbroker.engine.persistence import CheckpointResult, Persistence, PersistenceObserver, RestoreResult
from kvbroker.engine.ports import LiveFigures, MethodStats, NullObserver, Observer, RpcStats, Span
from kvbroker.engine.sessions import SessionEnded, SessionEvent, SessionOpened

__all__ = [
    "MAX_LISTED_MOVES", "CacheHandle", "CachePage", "DefragmentResult", "Engine", "EngineSettings",
    "EngineStatus", "LiveFigures", "MoveView", "MethodStats", "NullObserver", "Observer", "RpcStats", "SessionEnded", "SessionEvent",
    "SessionOpened", "SessionView", "Span", "CheckpointResult", "Persistence", "PersistenceObserver", "RestoreResult",
]
