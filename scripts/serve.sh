#!/usr/bin/env bash
# Install kvbroker into .venv and run the daemon in the foreground.
# With no arguments it serves every visible GPU, else the host device (POSIX shared
# memory), on 127.0.0.1:50051 and a Unix socket. Arguments go to `kvbroker serve`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/kvbroker" serve "$@"
