"""Figures for people: byte counts, ratios, durations, latencies, times, bars, tables, JSON.

Pure functions (value in, text out), shared by every view of the CLI, so each is tested
once and every command prints a figure the same way.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(nbytes: int) -> str:
    """A byte count for people, in binary units: ``"512 B"``, ``"1.50 KiB"``, ``"8.00 GiB"``.

    Three significant digits from KiB up (``"12.5 MiB"``, ``"512 MiB"``), so the columns
    stay narrow; a value never rounds up to 1024 of a unit (it moves to the next one).
    """
    sign, n = ("-", -nbytes) if nbytes < 0 else ("", nbytes)
    if n < 1024:
        return f"{sign}{n} B"
    value, unit = float(n), "B"
    for unit in _BYTE_UNITS:
        value /= 1024
        if round(value, 2 if value < 10 else 1 if value < 100 else 0) < 1024 or unit == _BYTE_UNITS[-1]:
            break
    digits = 2 if value < 9.995 else 1 if value < 99.95 else 0
    return f"{sign}{value:.{digits}f} {unit}"


def format_ratio(ratio: float) -> str:
    """A 0..1 ratio as a percentage with one decimal: ``0.3125 -> "31.2%"``."""
    return "-" if math.isnan(ratio) else f"{ratio * 100:.1f}%"


def format_duration(seconds: float) -> str:
    """A coarse duration: ``"45s"``, ``"12m 05s"``, ``"2h 13m"``, ``"3d 04h"``."""
    s = max(0, int(seconds))
    days, rest = divmod(s, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_latency(seconds: float) -> str:
    """A latency for people: ``"0.62 ms"``, ``"12.5 ms"``, ``"1.20 s"``; ``"-"`` for NaN."""
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 9.995 else f"{ms:.1f} ms" if ms < 99.95 else f"{ms:.0f} ms"


def format_rate(per_second: float) -> str:
    """Events per second: ``"0"``, ``"0.25/s"``, ``"12.5/s"``, ``"1200/s"``."""
    if per_second <= 0 or math.isnan(per_second):
        return "0"
    digits = 2 if per_second < 9.995 else 1 if per_second < 99.95 else 0
    return f"{per_second:.{digits}f}/s"


def seconds_of(stamp: Timestamp) -> float:
    """Unix seconds of a Timestamp field (0.0 when it is unset)."""
    return stamp.seconds + stamp.nanos / 1e9


def format_time(stamp: Timestamp) -> str:
    """A point in time as ISO 8601 in UTC, to the second: ``"2026-11-22T10:11:12Z"``;
    ``"-"`` when unset."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return datetime.datetime.fromtimestamp(stamp.seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_age(stamp: Timestamp, now: float) -> str:
    """How long ago ``stamp`` was (``format_duration``); ``"-"`` when unset."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return format_duration(now - seconds_of(stamp))


def bar(capacity: int, used: int, pinned: int = 0, width: int = 20) -> str:
    """``[==####..........]``: pinned bytes ``=``, the rest of the used bytes ``#``, free
    ``.``, over ``width`` cells of ``capacity`` (ASCII, so it survives any log)."""
    if capacity <= 0:
        return "[" + " " * width + "]"
    pinned_cells = min(width, round(width * max(0, pinned) / capacity))
    used_cells = min(width, max(pinned_cells, round(width * max(0, used) / capacity)))
    return "[" + "=" * pinned_cells + "#" * (used_cells - pinned_cells) + "." * (width - used_cells) + "]"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """Rows as aligned columns, two spaces apart, no trailing blanks.

    Args:
        headers: column titles.
        rows: one sequence of cells per row; cells are turned into ``str``.
        align: one letter per column, ``"l"`` or ``"r"``; missing letters mean ``"l"``.
            Numbers read best right-aligned.
    """
    table = [list(map(str, headers))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = []
    for row in table:
        cells = [
            cell.rjust(width) if align[i : i + 1] == "r" else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def to_json(message: Message) -> str:
    """A response as indented JSON: the proto3 mapping with the proto's field names, every
    field present (zeros included), in the proto's field order. Timestamps are RFC 3339
    strings, 64-bit integers strings (the mapping's rules, as grpcurl prints them)."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return json.dumps(_in_field_order(message.DESCRIPTOR, data), indent=2)


def dumps(data: Any) -> str:
    """JSON of a view the CLI computes itself (``ls --group-by``, ``ping``, ``top``)."""
    return json.dumps(data, indent=2)


def _in_field_order(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its keys in ``descriptor``'s field order (MessageToDict puts set
    fields first), recursing into nested messages (not into well-known types, whose JSON
    is a string)."""
    ordered = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if isinstance(value, list):
                value = [_in_field_order(field.message_type, v) if isinstance(v, dict) else v for v in value]
            elif isinstance(value, dict):
                value = _in_field_order(field.message_type, value)
        ordered[field.name] = value
    return ordered
