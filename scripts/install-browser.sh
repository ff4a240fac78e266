#!/usr/bin/env bash
# Debian's Chromium for the console's browser tests (tests/browser): Playwright drives it with
# executable_path=/usr/bin/chromium (`playwright install` cannot download browsers here).
# Idempotent and quick when it is there already. Called by scripts/bootstrap.sh and, when the
# browser is missing, by the browser tests' session fixture.
set -euo pipefail
browser=${RELAY_CHROMIUM:-/usr/bin/chromium}
if [ -x "$browser" ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[install-browser] $browser is missing; run as root: apt-get install -y chromium" >&2
  exit 1
fi
echo "[install-browser] installing chromium from Debian's packages" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
