#!/usr/bin/env bash
# Build the relay's image from the Dockerfile with buildah (no Docker engine needed), on the local
# Debian base image when no registry is reachable.
#
# Usage: scripts/build-image.sh [TAG]     (default TAG: localhost/outbox-relay:dev)
# Env:   BASE_IMAGE      base of both stages (default: the local one, scripts/build-base-image.sh)
#        PIP_CA_BUNDLE   CA bundle pip trusts during the build, handed in as a build secret and
#                        never stored in the image (default: PIP_CERT, else the system bundle)
# Prints the tag on stdout. The image is cached in the project's buildah storage: when TAG already
# holds an image built from the same context (Dockerfile, pyproject.toml, README.md, relay/,
# schemas/) on the same base, nothing is rebuilt. No --layers: with the vfs driver every cached
# layer is a full copy of the root filesystem, which costs more than it saves.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/buildah-env.sh"
tag="${1:-localhost/outbox-relay:dev}"
base="${BASE_IMAGE:-$(bash "$root/scripts/build-base-image.sh")}"
ca="${PIP_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
secret=()
[ -s "$ca" ] && secret=(--secret "id=pip_ca,src=$ca")
revision="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"

base_id="$(relay_buildah inspect --type image --format '{{.FromImageID}}' "$base" 2>/dev/null || echo "$base")"
context_hash="$(cd "$root" && {
  echo "$base_id"
  find Dockerfile .dockerignore pyproject.toml README.md relay schemas -type f \
    ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-32)"
label=org.outbox-relay.context-sha256
have="$(relay_buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$label\"}}" \
  "$tag" 2>/dev/null || true)"
if [ "$have" = "$context_hash" ]; then
  echo "build-image: $tag is up to date (context $context_hash)" >&2
  echo "$tag"; exit 0
fi

relay_buildah bud --isolation chroot --format oci \
  --build-arg "BASE_IMAGE=$base" --build-arg "REVISION=$revision" --label "$label=$context_hash" \
  "${secret[@]}" -f "$root/Dockerfile" -t "$tag" "$root" >&2
relay_buildah rmi --prune >/dev/null 2>&1 || true  # the previous build's image, now untagged
echo "$tag"
