#!/usr/bin/env bash
# Install promtool and the Prometheus server from Debian's `prometheus` package, unpacked into a
# per-user cache (no system install: the package's service is not started, nothing else changes).
#
# Usage: scripts/install-prometheus-tools.sh        -> prints the directory holding both binaries
# Env:   PROMETHEUS_DEB_VERSION  the pinned Debian version (default below; "candidate" = newest)
#        RELAY_TOOLS_CACHE       cache root (default ${XDG_CACHE_HOME:-~/.cache}/outbox-relay)
# Exit:  0 with the bin directory on stdout; 1 with the reason on stderr when it cannot install.
# Idempotent: a second run finds the cached binaries and does no network access.
set -euo pipefail

pinned="${PROMETHEUS_DEB_VERSION:-2.42.0+ds-5+deb12u1}"
cache_root="${RELAY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}"

fail() { echo "install-prometheus-tools: cannot install: $*" >&2; exit 1; }

check() {  # $1: bin dir; both binaries present and runnable
  [ -x "$1/promtool" ] && [ -x "$1/prometheus" ] && "$1/promtool" --version >/dev/null 2>&1
}

if [ "$pinned" != "candidate" ]; then
  bin="$cache_root/prometheus-$pinned/usr/bin"
  if check "$bin"; then echo "$bin"; exit 0; fi
fi

command -v apt-get >/dev/null || fail "apt-get not found (this script uses Debian's package)"
command -v dpkg-deb >/dev/null || fail "dpkg-deb not found"

known() { apt-cache madison prometheus 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}'; }
versions="$(known)"
if [ -z "$versions" ]; then
  # Package lists not downloaded yet (fresh container): fetch them once.
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 || fail "apt-get update failed"
    versions="$(known)"
  fi
fi
[ -n "$versions" ] || fail "no 'prometheus' package known to apt (run 'apt-get update' as root?)"

if [ "$pinned" = "candidate" ] || ! grep -qxF "$pinned" <<<"$versions"; then
  chosen="$(head -n1 <<<"$versions")"
  [ "$pinned" = "candidate" ] ||
    echo "install-prometheus-tools: pinned $pinned not available; using $chosen" >&2
else
  chosen="$pinned"
fi

bin="$cache_root/prometheus-$chosen/usr/bin"
if check "$bin"; then echo "$bin"; exit 0; fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt-get download works unprivileged only in a writable dir; the _apt sandbox user needs access.
chmod 0777 "$work"
(cd "$work" && apt-get download -qq "prometheus=$chosen" >&2) ||
  fail "apt-get download prometheus=$chosen failed"
deb="$(ls "$work"/prometheus_*.deb 2>/dev/null | head -n1)"
[ -n "$deb" ] || fail "apt-get download produced no .deb"
mkdir -p "$work/root"
dpkg-deb -x "$deb" "$work/root" || fail "dpkg-deb could not unpack $deb"
target="$cache_root/prometheus-$chosen"
mkdir -p "$cache_root"
rm -rf "$target.tmp" && mv "$work/root" "$target.tmp"
rm -rf "$target" && mv "$target.tmp" "$target"  # atomic-ish: a half unpack is never "cached"
check "$bin" || fail "unpacked package lacks runnable promtool/prometheus in $bin"
echo "$bin"
