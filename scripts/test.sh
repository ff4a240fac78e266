#!/usr/bin/env bash
# The whole test suite: lint and types, unit tests, then integration tests on a real PostgreSQL 15
# and a real Kafka broker started for the run (or RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS).
set -euo pipefail
cd "$(dirname "$0")/.."
# The tools some tests build from the Go module proxy (Helm, Toxiproxy: minutes on a new machine,
# cached after) are started building now, for the whole suite, beside the install and the lint:
# those tests then find them built, or wait for that build under its lock.
if [ $# -eq 0 ]; then
  (bash scripts/install-helm.sh || true; bash scripts/install-toxiproxy.sh || true) >/dev/null 2>&1 &
fi
source scripts/bootstrap.sh
# The console's browser tests drive Debian's Chromium (only the suite needs it, not the demo).
bash scripts/install-browser.sh || echo "[test] no Chromium: tests/browser will try again" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --diff . | head -40; exit 1; }
.venv/bin/mypy
# Three workers by default (RELAY_TEST_WORKERS; 0 runs in this process): the suite mostly waits on
# servers and timers, about half of two cores when run serially (on 2 cores, one clean-clone run
# each: pytest 967 s with two workers, 839 s with three). Each worker starts its own
# PostgreSQL and Kafka (or both use RELAY_DATABASE_URL / RELAY_KAFKA_BOOTSTRAP_SERVERS) and takes
# whole files, so that a module's fixtures (a broker, a built image) are made once.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 \
  -n "${RELAY_TEST_WORKERS:-3}" --dist loadfile "$@"
