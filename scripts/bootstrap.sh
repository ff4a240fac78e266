#!/usr/bin/env bash
# Make .venv with the project and its dev tools installed; check the server binaries the local
# services need (PostgreSQL 15 server, Java 17+, Maven). Sourced by scripts/test.sh and demo.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv" >&2
  "$python" -m venv .venv
fi
stamp=.venv/.relay-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing the project and its dev tools into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e '.[dev]' >&2
  echo "$want" > "$stamp"
fi

missing=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || [ -n "${RELAY_DATABASE_URL:-}" ] || missing+=(postgresql-15)
command -v java >/dev/null || [ -n "${RELAY_KAFKA_BOOTSTRAP_SERVERS:-}" ] || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || [ -n "${RELAY_KAFKA_BOOTSTRAP_SERVERS:-}" ] || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[bootstrap] installing ${missing[*]} from Debian's packages" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
