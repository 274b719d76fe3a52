#!/usr/bin/env bash
# Install kvbroker with its dev tools into .venv, then run every check CI runs:
# generated protobuf code up to date, import layering, and the whole pytest suite.
# Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KVBROKER_EXTRAS=dev source "$root/scripts/bootstrap.sh"
cd "$root"
echo "== generated protobuf code matches proto/ =="
.venv/bin/python scripts/gen_proto.py --check
echo "== import layering (import-linter) =="
.venv/bin/lint-imports --no-cache
echo "== tests =="
.venv/bin/python -m pytest "$@"
