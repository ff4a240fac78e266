#!/usr/bin/env bash
# Build the Toxiproxy server (a TCP proxy that injects network faults) from the Go module proxy
# (pinned), once, into the dev cache. The fault suite (tests/faults) puts it between the relay and
# PostgreSQL / Kafka on loopback.
#
# Usage: scripts/install-toxiproxy.sh   -> prints the path of the toxiproxy-server binary
# Env:   TOXIPROXY_VERSION  pinned module version (default below)
#        RELAY_DEV_CACHE    cache root (default ~/.cache/relay-dev); the binary lands in
#                           $RELAY_DEV_CACHE/tools/toxiproxy-$TOXIPROXY_VERSION/toxiproxy-server
# Exit:  0 with the path on stdout; 1 with the reason on stderr. A cached binary means no network.
set -euo pipefail

version="${TOXIPROXY_VERSION:-v2.12.0}"
dir="${RELAY_DEV_CACHE:-$HOME/.cache/relay-dev}/tools/toxiproxy-$version"
bin="$dir/toxiproxy-server"
module="github.com/Shopify/toxiproxy/v2"

fail() { echo "install-toxiproxy: cannot install: $*" >&2; exit 1; }

built() { [ -x "$bin" ] && "$bin" -version 2>/dev/null | grep -qF "$version"; }
if built; then echo "$bin"; exit 0; fi
command -v go >/dev/null || fail "the go command is not on PATH (Go 1.22+ builds Toxiproxy)"
mkdir -p "$dir"
# One build at a time (the test runner starts one in the background; two test workers may ask at
# once): a second caller waits here for the first, then finds its binary.
exec 9>"$dir.lock"
flock 9
if built; then echo "$bin"; exit 0; fi
rm -rf "$dir.tmp"
echo "install-toxiproxy: building $module/cmd/server@$version (a minute, once)" >&2
# CGO off: a static binary; -trimpath -s -w: smaller, reproducible; -X: -version names the pin.
GOBIN="$dir.tmp" CGO_ENABLED=0 GOFLAGS=-buildvcs=false go install -trimpath \
  -ldflags "-s -w -X $module.Version=$version" "$module/cmd/server@$version" >&2 ||
  fail "go install $module/cmd/server@$version failed"
mv "$dir.tmp/server" "$bin" && rmdir "$dir.tmp"
built || fail "the built toxiproxy-server does not run or is not $version"
echo "$bin"
