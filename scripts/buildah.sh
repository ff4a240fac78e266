#!/usr/bin/env bash
# buildah on the project's own storage (see buildah-env.sh): scripts/buildah.sh images, ... run, ...
# exec: signals sent to this script reach buildah (and, through `buildah run`, the container).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/buildah-env.sh"
exec buildah --root "$RELAY_CONTAINER_CACHE/storage" --runroot "$RELAY_CONTAINER_CACHE/run" \
  --storage-driver vfs "$@"
