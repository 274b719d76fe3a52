"""Sizes and priorities as people write them: ``"512MiB"``, ``size_mb=512``, ``"high"``.

Workers that come from kvcached (README, "Coming from the kvcached guide":
``request_cache(model_name=..., size_mb=512, priority="high")``) write sizes in megabytes
and priorities as names; the wire carries bytes and integers. This module turns the one into the other, before anything is sent,
with ``InvalidRequest`` naming the argument when it cannot. Pure: no I/O, no torch.

Sizes (``parse_size``): an ``int`` is bytes; a string is a number and a unit, the
daemon's configuration grammar: ``B`` (or none); binary ``KiB``/``MiB``/``GiB``/``TiB``
(also ``Ki``/``Mi``/``Gi``/``Ti``, powers of 1024); decimal ``KB``/``MB``/``GB``/``TB``
(also ``K``/``M``/``G``/``T``, powers of 1000). Case does not matter, a space may
separate them, the number may have a fraction (``"1.5GiB"``). ``size_mb`` and
``size_gb`` are the guide's arguments and mean what its arithmetic means: mebibytes
(``size_mb * 1024 * 1024``) and gibibytes.

Priorities (``PRIORITIES``): ``"low"`` is -100, ``"normal"`` 0, ``"high"`` 100; an
``int`` passes as is; ``None`` (the default) is the pool's own priority. A request
evicts only caches of equal or lower priority, and its cache is evicted only for
requests of equal or higher priority (README, "Semantics"), so ``"high"`` outranks
every pool priority of the example configuration and ``"low"`` none of them.
"""

from __future__ import annotations

import math
import operator
import re
from typing import TypeAlias

from kvbroker.wire import SIZE_UNITS
from kvbroker_client.errors import InvalidRequest

__all__ = ["MiB", "GiB", "PRIORITIES", "PriorityLike", "SizeLike", "parse_size", "priority_value", "request_bytes"]

MiB = 1 << 20
GiB = 1 << 30

#: Priority names and the integers they stand for (see the module docstring).
PRIORITIES: dict[str, int] = {"low": -100, "normal": 0, "high": 100}

SizeLike: TypeAlias = "int | str"
PriorityLike: TypeAlias = "int | str | None"

_UNITS = SIZE_UNITS  # the daemon's configuration reads the same table (kvbroker.wire)
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(value: SizeLike, field: str = "size") -> int:
    """Bytes from an ``int`` or a string such as ``"512MiB"`` (see the module
    docstring); a fraction of a byte rounds up. Raises ``InvalidRequest`` naming
    ``field``."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{field}: expected a size, got {value!r}")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match and match.group(2).lower() in _UNITS:
            return math.ceil(float(match.group(1)) * _UNITS[match.group(2).lower()])
        raise InvalidRequest(f"{field}: expected a size such as 1048576, \"512MiB\" or \"2GiB\", got {value!r:.80}")
    try:
        nbytes = operator.index(value)
    except TypeError:
        raise InvalidRequest(f"{field}: expected bytes (an int) or a string such as \"512MiB\", got {value!r:.80}") from None
    if nbytes < 0:
        raise InvalidRequest(f"{field}: must be >= 0, got {nbytes}")
    return nbytes


def request_bytes(
    size_bytes: int | None = None, size: SizeLike | None = None,
    size_mb: float | None = None, size_gb: float | None = None,
) -> int | None:  # fmt: skip
    """The one size a request gives, in bytes (None: none given). Raises
    ``InvalidRequest`` when more than one is given or one is not a size."""
    given = {k: v for k, v in (("size_bytes", size_bytes), ("size", size), ("size_mb", size_mb),
                               ("size_gb", size_gb)) if v is not None}  # fmt: skip
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequest(f"{'/'.join(given)}: give one size, not {len(given)}")
    (field, value), = given.items()
    if field in ("size_mb", "size_gb"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"{field}: must be a non-negative number, got {value!r:.80}")
        return math.ceil(value * (MiB if field == "size_mb" else GiB))
    if field == "size":
        return parse_size(value, field)
    return value  # size_bytes: checked where the request is built, as before


def priority_value(priority: PriorityLike) -> int | None:
    """The integer priority for an ``int``, a name of ``PRIORITIES`` or None (the pool's).
    Raises ``InvalidRequest``."""
    if isinstance(priority, str):
        try:
            return PRIORITIES[priority.strip().lower()]
        except KeyError:
            names = ", ".join(f"{k!r} ({v})" for k, v in PRIORITIES.items())
            raise InvalidRequest(f"priority: {priority!r:.80} is not one of {names} or an integer") from None
    return priority
