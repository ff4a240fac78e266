"""Every metric the daemons export, and the small functions the daemons call to record events.

Two kinds of numbers, kept apart on purpose:

- *Process counters* (attempts, transitions, latency, observations...): each replica counts what it
  did itself, so ``sum`` over replicas is the truth.
- *Outbox gauges* (effects by state, age of the oldest PENDING/UNKNOWN/STUCK): read from the
  database at scrape time by :class:`OutboxCollector`, so every replica reports the *same* number.
  Never ``sum`` them over replicas: take ``max`` (the alert rules do).

Label values are bounded: states, attempt outcomes and answers are the known names listed here,
effect types and topics come from the configuration; anything else is counted as ``other``. The
daemons hand over plain counts and names: this package knows nothing of their types.

Counts about database work are true only once that work commits: code that records inside a
transaction wraps it in :func:`deferred`, so a rolled-back batch (read again later) is not counted
twice.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psycopg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from relay.logs import redact
from relay.sql import query
from relay.states import ALLOWED_TRANSITIONS, EffectState

log = logging.getLogger(__name__)

# ``*_created`` series double the series count and no rule or panel of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

OTHER = "other"
# How a publish attempt ended: the values of relay.dispatch.outcomes.AttemptOutcome.
ATTEMPT_OUTCOMES = ("acked", "rejected", "unknown", "not_sent", "released", "aborted")
OBSERVATION_ANSWERS = ("present", "absent", "duplicate", "inconclusive", "error")
RESULT_OUTCOMES = ("committed", "rejected", "unknown")
QUARANTINE_REASONS = ("malformed", "orphaned", "conflicting", "late", "misrouted", "failed")
VERIFICATION_RESULTS = ("found", "absent", "unreachable", "stuck")
DAEMONS = ("relay", "reconciler")
LOOPS = ("results", "timers")

# Enqueue to Kafka ack: from milliseconds (idle relay woken by the doorbell) to many minutes
# (outage backlog, scheduled retries).
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0,
)  # fmt: skip

BUILD_INFO = Gauge(
    "relay_build_info",
    "Always 1: which daemon serves these metrics, and its version.",
    ["daemon", "version"],
    registry=REGISTRY,
)
INTAKE_OUTCOMES = ("promoted", "rejected", "refused")
ATTEMPTS = Counter(
    "relay_attempts",
    "Publish attempts by how they ended (acked, rejected, unknown, not_sent, released, aborted).",
    ["outcome"],
    registry=REGISTRY,
)
PUBLISH_LATENCY = Histogram(
    "relay_publish_latency_seconds",
    "Time from enqueue (effect created_at, database clock) to the Kafka acknowledgement.",
    buckets=LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
TRANSITIONS = Counter(
    "relay_transitions",
    "Effect state transitions recorded by this process.",
    ["from_state", "to_state"],
    registry=REGISTRY,
)
INTAKE_READ = Counter(
    "relay_intake_read",
    "Intents read from the intake: promoted (now effects: claimed at once, or PENDING), rejected "
    "(failed a check the intake does not make: REJECTED with the reason), refused (key names "
    "another effect: kept in relay.intake_refused).",
    ["outcome"],
    registry=REGISTRY,
)
VERIFICATIONS = Counter(
    "relay_verifications",
    "Checks in Kafka of the relay's own ambiguous publishes, by what they found.",
    ["result"],
    registry=REGISTRY,
)
SETTLED = Counter(
    "relay_batches_settled",
    "Batches left without an outcome, settled by the receipts of their transactions: committed "
    "(published where the receipt says), aborted (no receipt: sent again), left (could not be "
    "settled so: lease expiry makes them UNKNOWN, to be looked for effect by effect).",
    ["result"],
    registry=REGISTRY,
)
SETTLED_RESULTS = ("committed", "aborted", "left")
OBSERVATIONS = Counter(
    "relay_observations",
    "Reconciler observations of UNKNOWN effects, by the observer's answer.",
    ["answer"],
    registry=REGISTRY,
)
RESULTS = Counter(
    "relay_results",
    "Downstream result events accepted by the reconciler, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "relay_results_quarantined",
    "Result events kept as evidence but not applied, by reason.",
    ["reason"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "relay_reconciler_consumer_lag_records",
    "Result records not yet consumed by this reconciler replica, over its assigned partitions.",
    ["topic"],
    registry=REGISTRY,
)
FAILED_ROUNDS = Gauge(
    "relay_reconciler_failed_rounds",
    "Rounds in a row that failed, per loop of this reconciler replica (results: the result "
    "consumer; timers: deadlines, deferred results, observations); 0 once a round succeeds.",
    ["loop"],
    registry=REGISTRY,
)

_STATE_VALUES = frozenset(s.value for s in EffectState)
NO_STATE = "NONE"  # from_state of an effect's first transition (its enqueue)

# Counts waiting for the transaction they describe to commit (see ``deferred``); per thread.
_PENDING: ContextVar[list[Callable[[], None]] | None] = ContextVar("relay_metrics", default=None)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold the counts recorded inside until the block ends without an exception.

    Wrap a database transaction in it (``with deferred(), conn.transaction():``): a batch that
    rolls back is read and applied again later, and must be counted once, when it commits.
    Nested blocks (savepoints) hand their counts to the enclosing block.
    """
    outer = _PENDING.get()
    held: list[Callable[[], None]] = []
    token = _PENDING.set(held)
    try:
        yield
    finally:
        _PENDING.reset(token)
    # Reached only when the block raised nothing.
    if outer is not None:
        outer.extend(held)
    else:
        for apply in held:
            apply()


def _inc(child: Any, amount: float = 1.0) -> None:
    held = _PENDING.get()
    if held is None:
        child.inc(amount)
    else:
        held.append(lambda: child.inc(amount))


def _bounded(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


def _init_relay_series() -> None:
    """Create every relay series at 0, so ``rate()`` and ``increase()`` see the first event."""
    for outcome in ATTEMPT_OUTCOMES:
        ATTEMPTS.labels(outcome)
    for source, targets in ALLOWED_TRANSITIONS.items():
        for target in targets:
            TRANSITIONS.labels(source.value, target.value)
    for result in VERIFICATION_RESULTS:
        VERIFICATIONS.labels(result)
    for outcome in INTAKE_OUTCOMES:
        INTAKE_READ.labels(outcome)
    for result in SETTLED_RESULTS:
        SETTLED.labels(result)


def _init_reconciler_series() -> None:
    # Compensations the reconciler enqueues are born PENDING.
    TRANSITIONS.labels(NO_STATE, EffectState.PENDING.value)
    for answer in OBSERVATION_ANSWERS:
        OBSERVATIONS.labels(answer)
    for outcome in RESULT_OUTCOMES:
        RESULTS.labels(outcome)
    for reason in QUARANTINE_REASONS:
        QUARANTINED.labels(reason)
    for loop in LOOPS:
        FAILED_ROUNDS.labels(loop).set(0)


_init_relay_series()


def _version() -> str:
    try:
        return version("outbox-relay")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def prepare(daemon: str) -> None:
    """Mark this process as ``daemon`` (relay | reconciler) and create its series at 0."""
    if daemon not in DAEMONS:
        raise ValueError(f"unknown daemon {daemon!r}; expected one of {DAEMONS}")
    BUILD_INFO.labels(daemon, _version()).set(1)
    if daemon == "reconciler":
        _init_reconciler_series()


# -- recording functions the daemons call -------------------------------------------------------


def record_publish(outcomes: Mapping[str, int], ack_latencies_s: Iterable[float] = ()) -> None:
    """One published batch: its attempts by how they ended (outcome -> count), and the
    enqueue-to-ack latency of each acked one (a negative one, the database's clock ahead of ours,
    counts as 0)."""
    for outcome, count in outcomes.items():
        if count > 0:
            ATTEMPTS.labels(_bounded(str(outcome), ATTEMPT_OUTCOMES)).inc(count)
    observe_all(PUBLISH_LATENCY, [max(0.0, seconds) for seconds in ack_latencies_s])


def observe_all(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe`` of each amount, with the buckets counted here first and each one
    incremented once: a drain's batch observes 5,000 latencies, and ``observe`` takes two locks
    for each (3 % of the relay's active CPU in a drain). It reads prometheus-client's own fields
    (``_upper_bounds``, ``_buckets``, ``_sum``), checked at each call; without them it observes
    one by one. The sum is added as one amount (its last bits may round otherwise)."""
    if not amounts:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total: Any = getattr(histogram, "_sum", None)
    if (
        not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or len(bounds) != len(buckets)
        or not callable(getattr(total, "inc", None))
    ):
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    for amount in amounts:
        if amount == amount:  # NaN is in no bucket (observe's loop finds none), only the sum
            # The first bound at or above it, as observe's loop finds (the last bound is +Inf).
            counts[bisect_left(bounds, amount)] += 1
    total.inc(sum(amounts))  # never raises: inf - inf is NaN, as observe's sum
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)


def record_intake_read(promoted: int, rejected: int, refused: int) -> None:
    """Intents the relay read from the intake, by what became of them."""
    for outcome, count in zip(INTAKE_OUTCOMES, (promoted, rejected, refused), strict=True):
        _inc(INTAKE_READ.labels(outcome), count)


def record_marked(states: Mapping[str, int]) -> None:
    """Transitions from DISPATCHING that the outcome marking really wrote, by state -> count
    (compare-and-set may skip some rows: they are not in the count)."""
    for state, count in states.items():
        record_transition(EffectState.DISPATCHING.value, state, count)


def record_transition(from_state: str | None, to_state: str, count: int = 1) -> None:
    """A state change this process wrote (``from_state`` None: the enqueue itself)."""
    if count <= 0:
        return
    source = NO_STATE if from_state is None else _bounded(str(from_state), _STATE_VALUES)
    _inc(TRANSITIONS.labels(source, _bounded(str(to_state), _STATE_VALUES)), count)


def record_leases_expired(count: int) -> None:
    """DISPATCHING effects whose attempt ended without a recorded outcome became UNKNOWN."""
    record_transition(EffectState.DISPATCHING.value, EffectState.UNKNOWN.value, count)


def record_verification(state: str, moved: int = 1) -> None:
    """One check in Kafka of an ambiguous publish ended with the effect in ``state``."""
    if moved <= 0:
        return
    result = {
        EffectState.PUBLISHED.value: "found",
        EffectState.PENDING.value: "absent",
        EffectState.UNKNOWN.value: "unreachable",
        EffectState.STUCK.value: "stuck",
    }.get(str(state), OTHER)
    VERIFICATIONS.labels(result).inc(moved)
    if state != EffectState.UNKNOWN.value:
        record_transition(EffectState.UNKNOWN.value, state, moved)


def record_settled(result: str, count: int) -> None:
    """Batches a round of the settler decided (``committed``, ``aborted``) or could not."""
    if count > 0:
        SETTLED.labels(_bounded(result, SETTLED_RESULTS)).inc(count)


def record_observation(answer: str) -> None:
    """An observer's answer that was applied to its effect (``error``: the observer failed)."""
    _inc(OBSERVATIONS.labels(_bounded(answer, OBSERVATION_ANSWERS)))


def record_result(outcome: str, count: int = 1) -> None:
    """Downstream results that moved their effects."""
    if count > 0:
        _inc(RESULTS.labels(_bounded(outcome, RESULT_OUTCOMES)), count)


def record_quarantined(reason: str, count: int = 1) -> None:
    """Result records kept as evidence but not applied (their verdict is the reason)."""
    if count > 0:
        _inc(QUARANTINED.labels(_bounded(reason, QUARANTINE_REASONS)), count)


def set_failed_rounds(loop: str, rounds: int) -> None:
    FAILED_ROUNDS.labels(_bounded(loop, LOOPS)).set(rounds)


def set_consumer_lag(lag_by_topic: Mapping[str, int]) -> None:
    """This replica's lag per result topic; topics it no longer consumes are dropped."""
    CONSUMER_LAG.clear()
    for topic, lag in lag_by_topic.items():
        CONSUMER_LAG.labels(topic).set(max(0, lag))


# -- the outbox, read from the database ---------------------------------------------------------


class OutboxCollector:
    """Effects by type and state and the oldest waiting effects, read from the database.

    At most one query per ``cache_s`` (several scrapers, or Prometheus HA pairs, share it). Its own
    connection, never the daemon's, with a statement timeout. If the query fails the outbox series
    are left out of the scrape (a stale number could hide or invent an alert) and
    ``relay_effects_query_success`` is 0.
    """

    def __init__(self, database_url: str, *, cache_s: float = 5.0, timeout_s: float = 5.0) -> None:
        self._url = database_url
        self._cache_s = cache_s
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._rows: list[tuple[Any, ...]] | None = None
        self._taken_at = float("-inf")
        self._duration_s = 0.0

    def describe(self) -> list[Metric]:
        """The names this collector may export (no samples): lets the registry detect clashes."""
        return list(self._families(None, ok=False, duration_s=0.0)) + list(
            self._families([], ok=True, duration_s=0.0)
        )

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            ok = True
            if now - self._taken_at >= self._cache_s:
                started = time.monotonic()
                try:
                    self._rows = self._query()
                except psycopg.Error as exc:
                    ok = False
                    self._rows = None
                    self._close()
                    log.warning("metrics: outbox query failed: %s", redact(str(exc).strip()))
                self._duration_s = time.monotonic() - started
                # A failure is retried at the next scrape, a success is shared for cache_s.
                self._taken_at = now if ok else float("-inf")
            rows = self._rows
        yield from self._families(rows, ok=rows is not None, duration_s=self._duration_s)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _query(self) -> list[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self._url,
                autocommit=True,
                application_name="relay-metrics",
                connect_timeout=max(1, int(self._timeout_s)),
            )
            self._conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (f"{int(self._timeout_s * 1000)}ms",),
            )
        return self._conn.execute(query("observability_snapshot")).fetchall()

    @staticmethod
    def _families(
        rows: list[tuple[Any, ...]] | None, *, ok: bool, duration_s: float
    ) -> Iterator[Metric]:
        success = GaugeMetricFamily(
            "relay_effects_query_success",
            "1 if the last read of the outbox for these metrics succeeded, else 0.",
            value=1.0 if ok else 0.0,
        )
        duration = GaugeMetricFamily(
            "relay_effects_query_duration_seconds",
            "How long the last read of the outbox for these metrics took.",
            value=duration_s,
        )
        yield success
        yield duration
        if rows is None:
            return
        counts: dict[tuple[str, str], float] = {}
        ages = {state: 0.0 for state in ("PENDING", "UNKNOWN", "STUCK")}
        types: set[str] = set()
        parked = {"parked": 0.0, "parked_effects": 0.0}
        for kind, effect_type, state, value in rows:
            if kind == "effects":
                types.add(str(effect_type))
                counts[(str(effect_type), str(state))] = float(value)
            elif kind == "type":
                types.add(str(effect_type))
            elif kind == "oldest_age" and state in ages:
                ages[str(state)] = max(0.0, float(value))
            elif kind in parked:
                parked[str(kind)] = float(value)
        effects = GaugeMetricFamily(
            "relay_effects",
            "Effects in the outbox by type and state, read from the database: the same on every "
            "replica, so aggregate with max, never sum.",
            labels=["effect_type", "state"],
        )
        for effect_type in sorted(types):
            for state in EffectState:
                effects.add_metric(
                    [effect_type, state.value], counts.get((effect_type, state), 0.0)
                )
        yield effects
        for state, help_text in (
            ("PENDING", "Outbox lag: how long the oldest due PENDING effect has waited."),
            ("UNKNOWN", "How long the oldest UNKNOWN effect has been UNKNOWN (0: none)."),
            ("STUCK", "How long the oldest STUCK effect has waited for a person (0: none)."),
        ):
            yield GaugeMetricFamily(
                f"relay_oldest_{state.lower()}_age_seconds",
                f"{help_text} Read from the database; aggregate with max.",
                value=ages[state],
            )
        yield GaugeMetricFamily(
            "relay_parked_groups",
            "Ordering groups whose effects wait behind a REJECTED, UNKNOWN or STUCK one (relay "
            "unblock releases them). Read from the database; aggregate with max.",
            value=parked["parked"],
        )
        yield GaugeMetricFamily(
            "relay_parked_effects",
            "PENDING effects waiting in parked ordering groups. Read from the database; "
            "aggregate with max.",
            value=parked["parked_effects"],
        )


def series_names(registry: CollectorRegistry, *extra: Any) -> set[str]:
    """Every series name a scrape of ``registry`` (and of the ``extra`` collectors) can contain,
    whether or not a labelled child exists yet: counters with ``_total``, histograms with
    ``_bucket``/``_sum``/``_count``."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
        "info": ("_info",),
    }
    families: list[Metric] = list(registry.collect())
    for collector in extra:
        families.extend(collector.describe())
    names: set[str] = set()
    for family in families:
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names


__all__ = [
    "REGISTRY",
    "OutboxCollector",
    "deferred",
    "prepare",
    "record_leases_expired",
    "record_marked",
    "record_observation",
    "record_publish",
    "record_quarantined",
    "record_result",
    "record_transition",
    "record_verification",
    "series_names",
    "set_consumer_lag",
]
