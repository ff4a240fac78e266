#!/usr/bin/env bash
# Build (once) a local Python base image from Debian's packages, for container builds on machines
# that reach no container registry: debootstrap --variant=minbase of Debian bookworm plus python3
# and python3-venv, committed into the project's own buildah storage (vfs driver, no daemon).
#
# Usage: scripts/build-base-image.sh   -> prints the image name (pass it as BASE_IMAGE)
# Env:   RELAY_DEV_CACHE    cache root (default ~/.cache/relay-dev); the root filesystem tarball
#                           and the buildah storage live under $RELAY_DEV_CACHE/container
#        DEBIAN_MIRROR      default: the first URI of this machine's apt sources
# Cached: the image (buildah storage) and the tarball it came from; a second run does no network
# access. Delete $RELAY_DEV_CACHE/container to start over.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/buildah-env.sh"

suite=bookworm
packages=python3,python3-venv
image="localhost/relay-base:$suite-python3"
tarball="$RELAY_CONTAINER_CACHE/base-$suite-python3.tar"

fail() { echo "build-base-image: $*" >&2; exit 1; }

if relay_buildah inspect --type image "$image" >/dev/null 2>&1; then
  echo "$image"; exit 0
fi

if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || fail "debootstrap not found (scripts/install-container-tools.sh)"
  mirror="${DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror="$(grep -hoE '(URIs:|^deb) +https?://[^ ]+/debian( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null |
      awk '{print $2}' | head -n1 || true)"
  fi
  mirror="${mirror:-http://deb.debian.org/debian}"
  work="$(mktemp -d "$RELAY_CONTAINER_CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "build-base-image: debootstrap $suite ($packages) from $mirror" >&2
  debootstrap --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror" >&2 ||
    fail "debootstrap failed (see $work/rootfs/debootstrap/debootstrap.log)"
  # Nothing the image needs at run time: package caches and lists, docs, the apt state of the host.
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
    "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/locale/*
  tar --numeric-owner -C "$work/rootfs" -cf "$tarball.tmp" . || fail "could not pack the root filesystem"
  mv "$tarball.tmp" "$tarball"
  rm -rf "$work"
  trap - EXIT
fi

ctr="$(relay_buildah from scratch)"
trap 'relay_buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
relay_buildah add "$ctr" "$tarball" / >/dev/null || fail "could not add $tarball to the image"
relay_buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd /usr/bin/python3 \
  --label org.opencontainers.image.description="Debian $suite minbase with python3 (local base)" \
  "$ctr"
relay_buildah commit --quiet "$ctr" "$image" >/dev/null || fail "could not commit $image"
echo "$image"
