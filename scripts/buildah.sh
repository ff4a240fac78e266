#!/usr/bin/env bash
# buildah on the project's own storage (see buildah-env.sh): scripts/buildah.sh images, ... run, ...
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/buildah-env.sh"
relay_buildah "$@"
