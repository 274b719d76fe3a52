#!/usr/bin/env bash
# Create .venv in the repository root (if missing) and install kvbroker into it.
# Sourced by scripts/serve.sh and scripts/test.sh; safe to run again.
#
# torch: pip would resolve a bare "torch" to a multi-GB CUDA build. The machines this
# project runs on carry a CPU build of torch 2.13.0 on disk, so it is installed first
# and the package's "torch>=2.4" is then already satisfied. On a GPU host, install the
# CUDA build of torch you want into .venv before running this script.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extras=${KVBROKER_EXTRAS:-}
stamp=".venv/.kvbroker-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
