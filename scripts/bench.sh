#!/usr/bin/env bash
# One benchmark command: bootstrap .venv, add the optional `bench` extra (matplotlib, lz4,
# zstandard from PyPI), then run every part with its figures beside their ceilings.
#   bash scripts/bench.sh [--quick] [python -m bench.all options]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh

stamp=.venv/.relay-bench-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bench] installing the bench extra into .venv" >&2
  .venv/bin/python -m pip install -q -e '.[dev,bench]' >&2
  echo "$want" > "$stamp"
fi
exec .venv/bin/python -m bench.all "$@"
