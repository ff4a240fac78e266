#!/usr/bin/env bash
# The whole test suite: lint and types, unit tests, then integration tests on a real PostgreSQL 15
# and a real Kafka broker started for the run (or RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
# The console's browser tests drive Debian's Chromium (only the suite needs it, not the demo).
bash scripts/install-browser.sh || echo "[test] no Chromium: tests/browser will try again" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --diff . | head -40; exit 1; }
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
