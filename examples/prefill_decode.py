"""Prefill in one process, decode in another: runs ``prefill_worker.py`` and then
``decode_worker.py``, two separate interpreters, with the prefill's hand-off (a line of
JSON) passed from one to the other. The prefill worker has exited before the decode
worker starts: the K/V it computed wait in the broker.

    ./scripts/serve.sh --devices host      # a daemon (any configuration with a "default" pool)
    python examples/prefill_decode.py [TARGET]   # default: $KVBROKER_TARGET, else 127.0.0.1:50051
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(worker: str, target: list[str], stdin: str = "") -> str:
    done = subprocess.run(
        [sys.executable, str(HERE / worker), *target], input=stdin, capture_output=True, text=True, check=False
    )
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{worker} failed with exit code {done.returncode}")
    return done.stdout


def main(target: list[str]) -> None:
    handoff = run("prefill_worker.py", target)
    print(f"hand-off: {handoff.strip()}")
    print(run("decode_worker.py", target, stdin=handoff), end="")


if __name__ == "__main__":
    main(sys.argv[1:2])
