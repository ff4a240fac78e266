"""Metrics, health and readiness for both daemons (``relay run`` and ``relay reconcile``).

A daemon calls :func:`start_observability` once when it starts and :func:`stop_observability`
when it stops, and the ``record_*`` functions of :mod:`relay.observability.metrics` where it
learns how something ended. See ``docs/operations.md`` for the metrics, alerts and runbooks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from relay.config import Settings
from relay.observability import metrics
from relay.observability.checks import standard_checks
from relay.observability.metrics import (
    deferred,
    record_intake_read,
    record_leases_expired,
    record_marked,
    record_observation,
    record_publish,
    record_quarantined,
    record_result,
    record_settled,
    record_transition,
    record_verification,
    set_consumer_lag,
    set_failed_rounds,
)
from relay.observability.server import Check, ObservabilityServer

log = logging.getLogger(__name__)


class Observability:
    """What :func:`start_observability` started; ``None`` server when metrics are off."""

    def __init__(self, server: ObservabilityServer | None, outbox: metrics.OutboxCollector | None):
        self.server = server
        self.outbox = outbox

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.outbox is not None:
            self.outbox.close()


def start_observability(
    settings: Settings,
    *,
    daemon: str,
    checks: Mapping[str, Check] | None = None,
    liveness: Mapping[str, Check] | None = None,
) -> Observability:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``metrics_host`` and the daemon's port
    (``metrics_port`` for the relay, ``reconcile_metrics_port`` for the reconciler; 0: off).

    ``checks`` default to database, migrations and Kafka; ``liveness`` (default none) are the
    daemon's in-process checks behind ``/healthz`` (503 when one fails). A port that cannot be
    bound is logged as an error and the daemon carries on: delivering effects matters more than
    being scraped, and the missing target fires the daemon-down alert.
    """
    metrics.prepare(daemon)
    port = settings.metrics_port_of(daemon)
    if port == 0:
        return Observability(None, None)
    outbox = metrics.OutboxCollector(
        settings.require_database_url(), cache_s=settings.metrics_cache_s
    )
    try:
        server = ObservabilityServer(
            settings.metrics_host,
            port,
            [metrics.REGISTRY, outbox],
            standard_checks(settings) if checks is None else checks,
            liveness=liveness,
        ).start()
    except OSError as exc:
        log.error(
            "cannot serve metrics on %s:%s: %s; running without /metrics",
            settings.metrics_host,
            port,
            exc,
        )
        return Observability(None, None)
    log.info(
        "serving /metrics, /healthz and /readyz",
        extra={"address": f"{settings.metrics_host}:{server.address[1]}", "daemon": daemon},
    )
    return Observability(server, outbox)


def stop_observability(running: Observability | None) -> None:
    if running is not None:
        running.stop()


__all__ = [
    "Check",
    "Observability",
    "ObservabilityServer",
    "deferred",
    "record_intake_read",
    "record_leases_expired",
    "record_marked",
    "record_observation",
    "record_publish",
    "record_quarantined",
    "record_result",
    "record_settled",
    "record_transition",
    "record_verification",
    "set_consumer_lag",
    "set_failed_rounds",
    "start_observability",
    "stop_observability",
]
