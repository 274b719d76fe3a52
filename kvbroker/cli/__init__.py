"""The ``kvbroker`` command: run the daemon, and the operator's views and actions on a running one.

    kvbroker serve [daemon flags...]      run the broker (``kvbroker serve --help``)
    kvbroker stats                        capacity and usage (total, per device, per pool), RPC latencies
    kvbroker ls [--pool P] [--model M] [--state S] [--sort size|age|last-used] [--limit N]
                [--group-by model|pool]   caches, their holders and pins; or sums per model or pool
    kvbroker sessions                     who is connected and what each holds
    kvbroker top [--interval S] [--iterations N]   a live view
    kvbroker ping [--count N]             health and round-trip time
    kvbroker defrag [--device D] [--pool P] [--dry-run]
    kvbroker release CACHE [--force]
    kvbroker evict --pool P [--idle] [--device D]
    kvbroker pool set P [--max SIZE] [--min SIZE] [--priority N] [--dry-run]

The operator commands talk to the broker through ``kvbroker_client`` as the caller's
sessionless holder, like ``grpcurl`` would, and take ``--target`` (default
``$KVBROKER_TARGET``, else ``127.0.0.1:50051``; ``unix:///path`` works), credentials,
``--timeout`` and ``--json`` (the response in the proto3 JSON mapping with the proto's
field names, as ``grpcurl`` prints it: 64-bit integers are strings, enums are names,
timestamps RFC 3339 strings, and zero values are kept so the shape never changes; the
views the CLI computes itself, ``ls --group-by``, ``ping`` and ``top``, print plain JSON).

Exit codes: 0 success, 1 the broker refused or could not be reached (``kvbroker: <why>``
on stderr; ``ping``: also when the broker does not serve), 2 a usage error.

One module per concern: ``formatting`` (figures and tables), ``views`` (stats, sessions,
defrag), ``caches`` (ls), ``acting`` (release, evict, pool set, ping), ``top`` (the live
view), ``entry`` (the parser, ``main`` and exit codes). Rendering functions are pure (message in,
text out), so they are tested without a broker.
"""

import os
import signal
import sys


def _exit_on_sigterm_as_pid_1() -> None:
    """In a container the ``kvbroker`` process is PID 1, and the kernel drops every signal
    PID 1 has no handler for: a SIGTERM during the seconds of start-up (imports, device
    discovery) would be lost and the runtime would SIGKILL the broker after its grace
    period. So, as PID 1 only, SIGTERM exits (status 143, unwinding like any exit) until
    the daemon installs its own handler when it serves. Cost: one getpid at import."""
    if os.getpid() == 1:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


_exit_on_sigterm_as_pid_1()  # first, before the imports that take the time

from kvbroker.cli.caches import render_caches  # noqa: E402
from kvbroker.cli.formatting import (  # noqa: E402
    format_bytes,
    format_duration,
    format_latency,
    format_ratio,
    render_table,
    to_json,
)
from kvbroker.cli.entry import ENV_TARGET, main  # noqa: E402
from kvbroker.cli.views import render_defrag, render_methods, render_sessions, render_stats  # noqa: E402

__all__ = [
    "ENV_TARGET", "format_bytes", "format_duration", "format_latency", "format_ratio", "main",
    "render_caches", "render_defrag", "render_methods", "render_sessions", "render_stats", "render_table",
    "to_json",
]  # fmt: skip
