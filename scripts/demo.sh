#!/usr/bin/env bash
# The main job: start throwaway PostgreSQL and Kafka (unless RELAY_DATABASE_URL /
# RELAY_KAFKA_BOOTSTRAP_SERVERS are set), run the relay, and show effects move through their states.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
exec .venv/bin/relay demo "$@"
