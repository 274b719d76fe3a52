#!/usr/bin/env bash
# Install kvbroker with its dev tools (and the transformers extra, for tests/hf) into .venv, then run every check CI runs:
# generated protobuf code up to date, import layering, and the whole pytest suite.
# Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KVBROKER_EXTRAS=dev,transformers source "$root/scripts/bootstrap.sh"
cd "$root"
# tests/telemetry run a real Prometheus server and promtool: Debian's prometheus package
# has both (the package's service is not started; the tests start their own).
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "== installing Debian's prometheus package (promtool and the server, for tests/telemetry) =="
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# tests/deploy build and run the Dockerfile's image with podman and runc (no Docker daemon
# on the CI machines), its base made by debootstrap, and check the compose file with
# docker-compose and podman-compose: Debian packages, installed when missing.
if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
   || ! command -v docker-compose >/dev/null 2>&1 || ! command -v podman-compose >/dev/null 2>&1; then
  echo "== installing podman, runc, debootstrap, docker-compose, podman-compose (for tests/deploy) =="
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman runc debootstrap docker-compose podman-compose >/dev/null
fi
echo "== generated protobuf code matches proto/ =="
.venv/bin/python scripts/gen_proto.py --check
echo "== import layering (import-linter) =="
.venv/bin/lint-imports --no-cache
echo "== tests =="
.venv/bin/python -m pytest "$@"
