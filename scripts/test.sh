#!/usr/bin/env bash
# The whole test suite: lint and types, unit tests, then integration tests on a real PostgreSQL 15
# and a real Kafka broker started for the run (or RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --diff . | head -40; exit 1; }
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
