"""What every benchmark here shares: the import path, a daemon, statistics, output.

Import path. The benchmarks are run from a checkout (``python benchmarks/X.py``), not
installed, and start the daemon with the tests' launcher (tests/support/daemon.py), so
that tests and benchmarks run the daemon one way. Each script therefore puts the
repository root on ``sys.path`` before importing ``benchmarks.harness``; this module adds
``client/`` (the ``kvbroker_client`` package). The launcher is imported only when a
daemon is started: the fragmentation benchmark (the pure core) needs no grpc.

Statistics. Percentiles are nearest-rank over all samples (no interpolation: a P99 is a
latency that a call really had); a ratio is a figure divided by a baseline measured in
the same run, since the machines are shared and absolute figures move with their load.

Output. A table for people; with ``--json``, stdout holds exactly one JSON object and
the table goes to stderr (``emit``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO / "client"), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from kvbroker import wire  # noqa: E402  (after the path set-up above)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

#: The metadata a ``kvbroker_client`` call carries (a session's id and its secret), and its
#: default deadline: benchmarks that use the generated stubs send the same, so a stub call
#: costs what a client's does.
SESSION_METADATA_KEY = wire.SESSION_ID_KEY
CALL_TIMEOUT_S = 10.0
_SECRETS: dict[tuple[str, str], str] = {}

T = TypeVar("T")


# -- processes and daemons ----------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmark's child process: the repository and client/
    importable, then ``extra``."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "client")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def daemon(**options: Any) -> Iterator[Any]:
    """A daemon for a benchmark (``tests.support.daemon.running_daemon``): host device,
    gRPC on 127.0.0.1 port 0 and a private Unix socket, stopped by SIGTERM at the end.
    ``options`` go to ``start_daemon`` (``config=``, ``host_capacity=``, ``metrics=``,
    ``env=``). It does not raise for an unclean exit: the caller reads
    ``daemon.exit_code`` and reports it with ``daemon.log_tail()``."""
    from tests.support.daemon import running_daemon

    with running_daemon(None, check=False, **options) as running:
        yield running


def metadata(session: str, target: str) -> tuple[tuple[str, str], ...]:
    """The metadata of ``session``'s calls to the broker at ``target``: its id and the
    secret the broker issued it. Each use renews the session with a Heartbeat (one RPC);
    a session that is new, or that ended since (its lease ran out while the benchmark
    waited), is opened, and the Heartbeat's initial metadata carries its secret."""
    import grpc

    from kvbroker.v1 import broker_pb2, broker_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        heartbeat = broker_pb2_grpc.CacheBrokerStub(channel).Heartbeat
        secret = _SECRETS.get((target, session))
        if secret is not None:
            try:
                heartbeat(broker_pb2.HeartbeatRequest(), timeout=CALL_TIMEOUT_S,
                          metadata=((SESSION_METADATA_KEY, session), (wire.SESSION_SECRET_KEY, secret)))  # fmt: skip
            except grpc.RpcError as err:
                if err.code() is not grpc.StatusCode.UNAUTHENTICATED:
                    raise
                secret = None  # it ended: open it again below
        if secret is None:
            _, call = heartbeat.with_call(
                broker_pb2.HeartbeatRequest(), metadata=((SESSION_METADATA_KEY, session),), timeout=CALL_TIMEOUT_S
            )
            secret = dict(call.initial_metadata())[wire.SESSION_SECRET_KEY]
            _SECRETS[(target, session)] = secret
    return ((SESSION_METADATA_KEY, session), (wire.SESSION_SECRET_KEY, secret))


def new_session(role: str) -> str:
    """A session id no other run uses."""
    return f"bench-{role}-{os.getpid()}-{secrets.token_hex(4)}"


# -- statistics ---------------------------------------------------------------------------


def seeded_rng(seed: int) -> random.Random:
    """A private generator: the same seed draws the same numbers in every run."""
    return random.Random(seed)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of an ascending sequence; NaN if empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize_ns(samples_ns: Sequence[int]) -> dict[str, float]:
    """P50/P90/P99/mean/max in milliseconds of nanosecond durations (``{"n": 0}`` if none)."""
    ms = sorted(s / 1e6 for s in samples_ns)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "max_ms": ms[-1],
    }


def ratios(summary: dict[str, float], floor: dict[str, float], percentiles: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Each percentile of ``summary`` divided by the same percentile of ``floor``."""
    return {f"p{p}_ratio": safe_ratio(summary.get(f"p{p}_ms"), floor.get(f"p{p}_ms")) for p in percentiles}


def safe_ratio(value: float | None, base: float | None) -> float:
    """``value / base``, NaN when either is missing or the base is zero."""
    if value is None or base is None or base == 0 or math.isnan(base):
        return float("nan")
    return value / base


def format_ratio(value: float, digits: int = 2) -> str:
    """``1.18x``; ``-`` for NaN."""
    return "-" if math.isnan(value) else f"{value:.{digits}f}x"


# -- timing -------------------------------------------------------------------------------


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the collector off for a timed loop (a collection inside one
    call would be that call's latency, not the broker's)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed_ns(fn: Callable[[], T], clock: Callable[[], int] = time.monotonic_ns) -> tuple[T, int, int]:
    """``fn()`` with its start and end times in nanoseconds (``time.monotonic_ns``:
    CLOCK_MONOTONIC, comparable between processes on one machine)."""
    start = clock()
    result = fn()
    return result, start, clock()


# -- machine noise ------------------------------------------------------------------------


def cpu_busy(sample_s: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``sample_s`` (from /proc/stat); NaN off Linux."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields[:8])

    try:
        idle0, total0 = read()
        time.sleep(sample_s)  # the measurement window of the busy fraction, not a wait
        idle1, total1 = read()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(max_wait_s: float, threshold: float = 0.15) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) until the machine is < ``threshold`` busy: other jobs
    share it. Returns (busy fraction last seen, seconds waited)."""
    started = time.monotonic()
    busy = cpu_busy()
    while busy >= threshold and time.monotonic() - started < max_wait_s:
        busy = cpu_busy()
    return busy, time.monotonic() - started


# -- output -------------------------------------------------------------------------------


def emit(result: dict[str, Any], table: str, *, as_json: bool, sort_keys: bool = False, indent: int | None = None) -> None:
    """The table on stdout, or with ``as_json`` on stderr and ``result`` as one JSON
    object on stdout."""
    out: TextIO = sys.stderr if as_json else sys.stdout
    print(table, file=out, flush=True)
    if as_json:
        print(json.dumps(result, sort_keys=sort_keys, indent=indent), flush=True)


def progress_logger(started: float | None = None) -> Callable[[str], None]:
    """A function that prints ``[  12.3 s] message`` to stderr (time since ``started``)."""
    origin = time.monotonic() if started is None else started

    def log(message: str) -> None:
        print(f"[{time.monotonic() - origin:6.1f} s] {message}", file=sys.stderr, flush=True)

    return log
