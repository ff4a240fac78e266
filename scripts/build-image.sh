#!/usr/bin/env bash
# Build the relay's image from the Dockerfile with buildah (no Docker engine needed), on the local
# Debian base image when no registry is reachable.
#
# Usage: scripts/build-image.sh [TAG]     (default TAG: localhost/outbox-relay:dev)
# Env:   BASE_IMAGE      base of both stages (default: the local one, scripts/build-base-image.sh)
#        PIP_CA_BUNDLE   CA bundle pip trusts during the build, handed in as a build secret and
#                        never stored in the image (default: PIP_CERT, else the system bundle)
# Prints the tag on stdout. Layers are cached in the project's buildah storage (--layers).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/buildah-env.sh"
tag="${1:-localhost/outbox-relay:dev}"
base="${BASE_IMAGE:-$(bash "$root/scripts/build-base-image.sh")}"
ca="${PIP_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
secret=()
[ -s "$ca" ] && secret=(--secret "id=pip_ca,src=$ca")
revision="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
relay_buildah bud --isolation chroot --layers --format oci \
  --build-arg "BASE_IMAGE=$base" --build-arg "REVISION=$revision" \
  "${secret[@]}" -f "$root/Dockerfile" -t "$tag" "$root" >&2
echo "$tag"
