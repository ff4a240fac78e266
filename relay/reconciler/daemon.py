"""``relay reconcile``: the result consumer and the timers, until SIGTERM.

Two threads with a connection each: one consumes the result topics (Kafka is read from this
thread only), the other sweeps deadlines, applies deferred results and asks observers. Every
change is a short transaction with ``FOR UPDATE SKIP LOCKED`` or a compare-and-set, so any number
of replicas can run; the consumer group shares the result partitions among them.

Neither loop may end on an error nobody foresaw: it is logged with its traceback and the loop goes
on after a backoff (a result batch is read again). A loop that fails ``reconcile_stall_rounds``
rounds in a row makes ``/readyz`` answer 503 and shows in ``relay_reconciler_failed_rounds``: a
consumer stuck on one batch must not look healthy. Should the timers thread die anyway,
``/healthz`` says so (503), so that the process is restarted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from typing import Any

import psycopg
from kafka import errors as kerr

from relay import db, observability
from relay.backoff import Backoff
from relay.config import Settings
from relay.errors import ServiceUnavailableError, describe
from relay.migrations import apply_status_events, check_current, sync_effect_types
from relay.observability.checks import standard_checks
from relay.reconciler.consumer import ResultConsumer, describe_counts
from relay.reconciler.deadlines import apply_deferred, expire_deadlines
from relay.reconciler.effects import reconciler_actor
from relay.reconciler.observation import Observations

log = logging.getLogger(__name__)


def register_status_type(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """Switch status events on (or off): transitions written from now on are published."""
    apply_status_events(conn, settings)


class Reconciler:
    """The reconciler daemon. ``run()`` blocks until ``stop()`` (e.g. from SIGTERM)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.actor = reconciler_actor(settings)
        self._stop = threading.Event()
        self.results = ResultConsumer(settings, self.actor)
        self.observations = Observations(settings, self.actor)
        self.answers: Counter[str] = Counter()
        self.expired = 0
        self.ready = threading.Event()
        self._timers_thread: threading.Thread | None = None
        self.failed_rounds: dict[str, int] = {"results": 0, "timers": 0}

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def timers_alive(self) -> None:
        """Liveness check: raises when the timers thread has died (it never ends on its own)."""
        thread = self._timers_thread
        if thread is None or thread.ident is None or thread.is_alive() or self.stopping:
            return
        raise RuntimeError("the timers thread died: deadlines and observations stopped")

    def advancing(self) -> None:
        """Readiness check: raises while a loop has failed ``reconcile_stall_rounds`` rounds in
        a row (a batch that fails every time, a sweep that cannot finish)."""
        stalled = [
            f"{loop} failed {n} rounds in a row"
            for loop, n in self.failed_rounds.items()
            if n >= self.settings.reconcile_stall_rounds
        ]
        if stalled:
            raise RuntimeError("; ".join(stalled))

    def _round(self, loop: str, ok: bool) -> None:
        self.failed_rounds[loop] = 0 if ok else self.failed_rounds[loop] + 1
        observability.set_failed_rounds(loop, self.failed_rounds[loop])

    def run(self) -> None:
        checks = {**standard_checks(self.settings), "progress": self.advancing}
        metrics = observability.start_observability(
            self.settings,
            daemon="reconciler",
            checks=checks,
            liveness={"timers": self.timers_alive},
        )
        timers = threading.Thread(target=self._timers, name="reconciler-timers", daemon=True)
        self._timers_thread = timers
        try:
            self._prepare()
            if self.stopping:
                return
            timers.start()
            self.ready.set()
            self._consume()
        finally:
            self.stop()
            if timers.is_alive():
                timers.join(timeout=60)
            self.observations.close()
            observability.stop_observability(metrics)
            log.info(
                "reconciler stopped",
                extra={
                    "results": describe_counts(self.results.counts),
                    "observations": describe_counts(self.answers),
                    "expired": self.expired,
                },
            )

    def _prepare(self) -> None:
        backoff = Backoff(0.5, self.settings.outage_backoff_max_s)
        while not self.stopping:
            try:
                with db.connect(self.settings, purpose="reconciler") as conn:
                    check_current(conn)
                    sync_effect_types(conn, self.settings)
                    register_status_type(conn, self.settings)
                log.info("reconciler starting", extra={"actor": self.actor})
                return
            except (psycopg.OperationalError, ServiceUnavailableError) as exc:
                self._wait(backoff.next_delay(), f"PostgreSQL unavailable: {describe(exc)}")

    def _wait(self, delay: float, why: str) -> None:
        log.warning("%s; retrying in %.1fs", why, delay)
        self._stop.wait(delay)

    def _consume(self) -> None:
        backoff = Backoff(0.5, self.settings.outage_backoff_max_s)
        conn: psycopg.Connection[Any] | None = None
        # The lag costs a request to the brokers: asked as often as the other metrics are
        # refreshed (metrics_cache_s), and not at all when nobody can scrape it.
        lag_every_s = self.settings.metrics_cache_s
        measure_lag = self.settings.metrics_port_of("reconciler") != 0
        last_lag = float("-inf")
        try:
            while not self.stopping:
                try:
                    if conn is None or conn.closed:
                        conn = db.connect(self.settings, purpose="reconciler-results")
                    self.results.poll_once(conn, timeout_s=0.5)
                    if measure_lag and time.monotonic() - last_lag >= lag_every_s:
                        last_lag = time.monotonic()
                        observability.set_consumer_lag(self.results.lag())
                    backoff.reset()
                    self._round("results", ok=True)
                    continue
                except (psycopg.OperationalError, ServiceUnavailableError) as exc:
                    _drop(conn)
                    conn = None
                    self._wait(backoff.next_delay(), f"PostgreSQL unavailable: {describe(exc)}")
                except psycopg.Error as exc:
                    log.warning("result batch not applied, it is read again: %s", exc)
                    _drop(conn)
                    conn = None
                    self._wait(backoff.next_delay(), f"database error: {describe(exc)}")
                except kerr.KafkaError as exc:
                    self.results.close()
                    self._wait(backoff.next_delay(), f"Kafka unavailable: {describe(exc)}")
                except Exception as exc:
                    # A bug or a record nobody foresaw must not stop the consumer for good: the
                    # batch was rewound and is read again after the backoff; the traceback is
                    # in the log.
                    log.exception("unexpected error in the result consumer")
                    _drop(conn)
                    conn = None
                    self._wait(backoff.next_delay(), f"unexpected error: {describe(exc)}")
                self._round("results", ok=False)
        finally:
            self.results.close()
            _drop(conn)

    def _timers(self) -> None:
        try:
            self._timer_loop()
        except BaseException:
            log.critical("the reconciler timers thread died; /healthz reports it", exc_info=True)
            raise

    def _timer_loop(self) -> None:
        backoff = Backoff(0.5, self.settings.outage_backoff_max_s)
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self.stopping:
                try:
                    if conn is None or conn.closed:
                        conn = db.connect(self.settings, purpose="reconciler-timers")
                    self.sweep(conn)
                    backoff.reset()
                    self._round("timers", ok=True)
                    self._stop.wait(self.settings.reconcile_interval_s)
                    continue
                except (psycopg.OperationalError, ServiceUnavailableError) as exc:
                    _drop(conn)
                    conn = None
                    self._wait(backoff.next_delay(), f"PostgreSQL unavailable: {describe(exc)}")
                except psycopg.Error as exc:
                    log.exception("database error in the reconciler timers")
                    _drop(conn)
                    conn = None
                    self._wait(backoff.next_delay(), f"database error: {describe(exc)}")
                except Exception as exc:  # deadlines and observations must not stop for good
                    log.exception("unexpected error in the reconciler timers")
                    _drop(conn)
                    conn = None
                    self._wait(backoff.next_delay(), f"unexpected error: {describe(exc)}")
                self._round("timers", ok=False)
        finally:
            _drop(conn)

    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        """One round of the timers: deadlines, deferred results, observations."""
        while not self.stopping:
            expired = expire_deadlines(conn, self.actor)
            self.expired += expired
            if expired < 500:
                break
        while not self.stopping and apply_deferred(conn, self.settings, self.actor) >= 200:
            pass
        if not self.stopping:
            self.answers.update(self.observations.run_due(conn))


def _drop(conn: psycopg.Connection[Any] | None) -> None:
    if conn is not None:
        with contextlib.suppress(psycopg.Error):
            conn.close()
