#!/usr/bin/env bash
# Make the local base image the container tests build kvbroker on, when it is absent.
#
# No image registry is reachable from the CI machines, so the official python image a user
# would build on (the Dockerfile's default BASE_IMAGE) cannot be pulled. Debian's
# packages can: debootstrap a minimal bookworm with python3 (3.11) and import it into
# podman's store as $KVBROKER_BASE_IMAGE (default localhost/debian-py:bookworm). The store
# persists between CI runs on the same machine, so this costs about 3 minutes once;
# later runs find the image and return at once.
set -euo pipefail
image=${KVBROKER_BASE_IMAGE:-localhost/debian-py:bookworm}
if podman image exists "$image"; then
  echo "base image $image: present"
  exit 0
fi
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # The mirror apt already uses (deb822 "URIs:" or a one-line "deb" source).
  mirror=$(grep -rhoE '^(URIs:[[:space:]]*|deb[[:space:]]+)https?://[^[:space:]]+/debian/?' \
             /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -n1 | grep -oE 'https?://[^[:space:]]+' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /var/tmp/kvbroker-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "base image $image: building from $mirror (debootstrap, about 3 minutes)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import - "$image" >/dev/null
echo "base image $image: built"
