#!/usr/bin/env bash
# Build the Helm 4 CLI from the Go module proxy (pinned), once, into the dev cache.
#
# Usage: scripts/install-helm.sh        -> prints the path of the helm binary
# Env:   HELM_VERSION     pinned module version (default below)
#        RELAY_DEV_CACHE  cache root (default ~/.cache/relay-dev); the binary lands in
#                         $RELAY_DEV_CACHE/tools/helm-$HELM_VERSION/helm
# Exit:  0 with the path on stdout; 1 with the reason on stderr. A cached binary means no network.
set -euo pipefail

version="${HELM_VERSION:-v4.3.2}"
dir="${RELAY_DEV_CACHE:-$HOME/.cache/relay-dev}/tools/helm-$version"
bin="$dir/helm"

fail() { echo "install-helm: cannot install: $*" >&2; exit 1; }

built() { [ -x "$bin" ] && [ "$("$bin" version --template '{{.Version}}' 2>/dev/null)" = "$version" ]; }
if built; then echo "$bin"; exit 0; fi
command -v go >/dev/null || fail "the go command is not on PATH (Go 1.24+ builds Helm 4)"
mkdir -p "$dir"
# One build at a time (the test runner starts one in the background; two test workers may ask at
# once): a second caller waits here for the first, then finds its binary.
exec 9>"$dir.lock"
flock 9
if built; then echo "$bin"; exit 0; fi
echo "install-helm: building helm.sh/helm/v4/cmd/helm@$version (a few minutes, once)" >&2
# CGO off: a static binary; -trimpath -s -w: smaller, reproducible; -X: helm version names the pin.
GOBIN="$dir.tmp" CGO_ENABLED=0 GOFLAGS=-buildvcs=false go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
  "helm.sh/helm/v4/cmd/helm@$version" >&2 ||
  fail "go install helm.sh/helm/v4/cmd/helm@$version failed"
mv "$dir.tmp/helm" "$bin" && rmdir "$dir.tmp"
built || fail "the built helm does not run or is not $version"
echo "$bin"
