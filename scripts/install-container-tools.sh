#!/usr/bin/env bash
# Install buildah (daemonless image builds) and debootstrap (the local base image) from Debian's
# packages, pinned to the versions below when the archive still serves them.
#
# Usage: scripts/install-container-tools.sh     -> prints "buildah <version>" on stdout
# Env:   BUILDAH_DEB_VERSION / DEBOOTSTRAP_DEB_VERSION  pinned versions ("candidate" = newest)
# Exit:  0 when both tools run; 1 with the reason on stderr when they cannot be installed
#        (not root, no apt-get). Idempotent: installed tools mean no network access.
set -euo pipefail

buildah_pin="${BUILDAH_DEB_VERSION:-1.28.2+ds1-3+deb12u1+b3}"
debootstrap_pin="${DEBOOTSTRAP_DEB_VERSION:-1.0.128+nmu2+deb12u2}"

fail() { echo "install-container-tools: cannot install: $*" >&2; exit 1; }
ready() { command -v buildah >/dev/null && command -v debootstrap >/dev/null; }

if ! ready; then
  [ "$(id -u)" = 0 ] || fail "buildah/debootstrap missing and not root (apt-get needs root)"
  command -v apt-get >/dev/null || fail "apt-get not found (these are Debian's packages)"
  served() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}'; }
  [ -n "$(served buildah)" ] || apt-get update -qq >&2 || fail "apt-get update failed"
  want=()
  for pkg in buildah debootstrap; do
    pin=$buildah_pin; [ "$pkg" = debootstrap ] && pin=$debootstrap_pin
    if [ "$pin" != candidate ] && served "$pkg" | grep -qxF "$pin"; then
      want+=("$pkg=$pin")
    else
      [ "$pin" = candidate ] || echo "install-container-tools: $pkg=$pin not served; newest" >&2
      want+=("$pkg")
    fi
  done
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >&2 ||
    fail "apt-get install ${want[*]} failed"
fi
ready || fail "buildah or debootstrap still not on PATH after installing"
buildah --version | awk '{print $1, $3}'
