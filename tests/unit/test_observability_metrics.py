"""Recording functions, the PromQL name extractor and the HTTP endpoints, without servers."""

from __future__ import annotations

import logging
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from relay.config import load_settings
from relay.errors import ConfigError
from relay.observability import metrics, start_observability
from relay.observability.metrics import REGISTRY
from relay.observability.promql import metric_names
from relay.observability.server import ObservabilityServer


def value(name: str, **labels: str) -> float:
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('max by (namespace) (relay_effects{state="STUCK"}) > 0', {"relay_effects"}),
        (
            "histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))",
            {"a_bucket"},
        ),
        ('sum(rate(x_total{a=~"b|c"}[5m] offset 1h)) / ignoring(a) group_left y', {"x_total", "y"}),
        ('absent(up{job="outbox-relay"} == 1)', {"up"}),
        ("max_over_time(g[1h:5m]) and on (instance) h unless bool k", {"g", "h", "k"}),
        ('{__name__="named_metric", job="x"}', {"named_metric"}),
        ("count(x) without (by_label) > 1e3", {"x"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_record_publish_counts_outcomes_and_observes_ack_latency() -> None:
    acked = value("relay_attempts_total", outcome="acked")
    unknown = value("relay_attempts_total", outcome="unknown")
    count = value("relay_publish_latency_seconds_count")
    total = value("relay_publish_latency_seconds_sum")
    below_5s = value("relay_publish_latency_seconds_bucket", le="5.0")
    metrics.record_publish(
        {"acked": 2, "unknown": 1},
        # The second acked: the database's clock ahead of ours, never a negative latency.
        [3.0, -2.0],
    )
    assert value("relay_attempts_total", outcome="acked") == acked + 2
    assert value("relay_attempts_total", outcome="unknown") == unknown + 1
    assert value("relay_publish_latency_seconds_count") == count + 2  # only acks have a latency
    assert value("relay_publish_latency_seconds_sum") == pytest.approx(total + 3.0)
    assert value("relay_publish_latency_seconds_bucket", le="5.0") == below_5s + 2


@settings(deadline=None)
@given(
    amounts=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
        | st.sampled_from([0.0, 0.005, 0.01, 1.0, 5.0, 60.0, 1800.0, math.inf, -math.inf])
        | st.just(math.nan),
        max_size=300,
    )
)
def test_observing_a_batch_counts_as_observing_each(amounts: list[float]) -> None:
    # observe_all counts the buckets itself, through prometheus-client's own fields: every
    # sample (buckets, count, sum) must be what one observe per amount gives.
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    buckets = metrics.LATENCY_BUCKETS_S
    each = Histogram("h", "h", buckets=buckets, registry=one_by_one)
    batch = Histogram("h", "h", buckets=buckets, registry=at_once)
    for amount in amounts:
        each.observe(amount)
    metrics.observe_all(batch, amounts)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    expected, got = samples(one_by_one), samples(at_once)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name])
        else:
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name


def test_record_marked_counts_only_the_rows_really_marked() -> None:
    def moved(to: str) -> float:
        return value("relay_transitions_total", from_state="DISPATCHING", to_state=to)

    published, unknown = moved("PUBLISHED"), moved("UNKNOWN")
    # Of PUBLISHED, PUBLISHED, UNKNOWN, one PUBLISHED lost its lease: compare-and-set skipped it.
    metrics.record_marked({"PUBLISHED": 1, "UNKNOWN": 1})
    assert moved("PUBLISHED") == published + 1
    assert moved("UNKNOWN") == unknown + 1


def test_settled_batches_are_counted_by_result() -> None:
    def settled(result: str) -> float:
        return value("relay_batches_settled_total", result=result)

    committed, aborted, left = settled("committed"), settled("aborted"), settled("left")
    metrics.record_settled("committed", 2)
    metrics.record_settled("aborted", 0)  # nothing decided: nothing counted
    metrics.record_settled("left", 1)
    metrics.record_settled("anything else", 1)  # bounded: counted as other, not a new series
    assert (settled("committed"), settled("aborted"), settled("left")) == (
        committed + 2,
        aborted,
        left + 1,
    )
    assert settled("other") >= 1


def test_verification_and_lease_expiry_are_transitions() -> None:
    found = value("relay_verifications_total", result="found")
    to_published = value("relay_transitions_total", from_state="UNKNOWN", to_state="PUBLISHED")
    unreachable = value("relay_verifications_total", result="unreachable")
    expired = value("relay_transitions_total", from_state="DISPATCHING", to_state="UNKNOWN")
    metrics.record_verification("PUBLISHED", 1)
    metrics.record_verification("UNKNOWN", 1)  # Kafka not reachable: no transition
    metrics.record_verification("PUBLISHED", 0)  # compare-and-set moved nothing
    metrics.record_leases_expired(3)
    assert value("relay_verifications_total", result="found") == found + 1
    assert value("relay_verifications_total", result="unreachable") == unreachable + 1
    assert (
        value("relay_transitions_total", from_state="UNKNOWN", to_state="PUBLISHED")
        == to_published + 1
    )
    assert value("relay_transitions_total", from_state="UNKNOWN", to_state="UNKNOWN") == 0
    assert (
        value("relay_transitions_total", from_state="DISPATCHING", to_state="UNKNOWN")
        == expired + 3
    )


def test_label_values_stay_bounded() -> None:
    other = value("relay_observations_total", answer="other")
    metrics.record_observation("a-new-answer-from-a-plugin")
    metrics.record_quarantined("some free text")
    metrics.record_transition("NOT_A_STATE", "CONFIRMED")
    assert value("relay_observations_total", answer="other") == other + 1
    assert (
        REGISTRY.get_sample_value(
            "relay_observations_total", {"answer": "a-new-answer-from-a-plugin"}
        )
        is None
    )
    assert value("relay_results_quarantined_total", reason="other") >= 1
    assert value("relay_transitions_total", from_state="other", to_state="CONFIRMED") >= 1


def test_consumer_lag_drops_topics_no_longer_assigned() -> None:
    metrics.set_consumer_lag({"a.results": 5, "b.results": 7})
    metrics.set_consumer_lag({"b.results": 2})
    assert (
        REGISTRY.get_sample_value("relay_reconciler_consumer_lag_records", {"topic": "a.results"})
        is None
    )
    assert value("relay_reconciler_consumer_lag_records", topic="b.results") == 2


def test_reconciler_series_exist_at_zero_once_prepared() -> None:
    metrics.prepare("reconciler")
    assert REGISTRY.get_sample_value("relay_results_total", {"outcome": "committed"}) is not None
    assert value("relay_build_info", daemon="reconciler", version=metrics._version()) == 1
    with pytest.raises(ValueError):
        metrics.prepare("cron")


# -- the HTTP endpoints ---------------------------------------------------------------------------


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


class Flaky:
    """A readiness check that fails with a password in its message, then recovers."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = True

    def __call__(self) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("cannot reach postgresql://app:hunter2@db:5432/app")


@pytest.fixture
def endpoints() -> Iterator[tuple[str, Flaky]]:
    flaky = Flaky()
    server = ObservabilityServer(
        "127.0.0.1", 0, [REGISTRY], {"always": lambda: None, "database": flaky}, ready_cache_s=0.2
    ).start()
    try:
        yield f"http://127.0.0.1:{server.address[1]}", flaky
    finally:
        server.stop()


def test_metrics_endpoint(endpoints: tuple[str, Flaky]) -> None:
    base, _ = endpoints
    status, content_type, body = get(base + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert '\nrelay_attempts_total{outcome="acked"} ' in body
    assert "# TYPE relay_publish_latency_seconds histogram" in body
    assert "process_start_time_seconds" in body
    assert "_created" not in body


def test_healthz_is_alive_even_when_not_ready(endpoints: tuple[str, Flaky]) -> None:
    base, _ = endpoints
    assert get(base + "/healthz")[0] == 200
    assert get(base + "/readyz")[0] == 503
    assert get(base + "/nope")[0] == 404


def test_readyz_names_the_failed_check_and_logs_why(
    endpoints: tuple[str, Flaky], caplog: pytest.LogCaptureFixture
) -> None:
    base, flaky = endpoints
    with caplog.at_level(logging.WARNING, logger="relay.observability.server"):
        status, _, body = get(base + "/readyz")
    assert status == 503
    # Fixed words only: which check failed, never the error's own text.
    assert body == "not ready\nalways: ok\ndatabase: FAILED\n"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "readiness check database failed: ConnectionError" in logged
    assert "hunter2" not in logged
    # Probes within the cache time share one round of checks.
    calls = flaky.calls
    get(base + "/readyz")
    assert flaky.calls == calls
    flaky.failing = False
    import time

    time.sleep(0.3)
    status, _, body = get(base + "/readyz")
    assert status == 200, body
    assert body.startswith("ready\n")


def test_a_taken_port_is_logged_and_the_daemon_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(
            None,
            database_url="postgresql://relay:pw@127.0.0.1:1/x",
            metrics_host="127.0.0.1",
            metrics_port=port,
        )
        with caplog.at_level(logging.ERROR):
            running = start_observability(settings, daemon="relay")
    assert running.server is None
    assert f"cannot serve metrics on 127.0.0.1:{port}" in caplog.text
    running.stop()


def test_metrics_port_zero_serves_nothing() -> None:
    settings = load_settings(None, database_url="postgresql://x@127.0.0.1:1/x", metrics_port=0)
    running = start_observability(settings, daemon="relay")
    assert running.server is None
    running.stop()


# -- counting only what commits -------------------------------------------------------------------


def test_deferred_counts_arrive_only_when_the_block_ends_cleanly() -> None:
    def moved() -> float:
        return value("relay_transitions_total", from_state="PUBLISHED", to_state="CONFIRMED")

    def malformed() -> float:
        return value("relay_results_quarantined_total", reason="malformed")

    before, quarantined = moved(), malformed()
    with metrics.deferred():
        metrics.record_transition("PUBLISHED", "CONFIRMED")
        metrics.record_quarantined("malformed")
        assert moved() == before  # held until the transaction it describes commits
    assert moved() == before + 1
    assert malformed() == quarantined + 1

    with pytest.raises(RuntimeError), metrics.deferred():
        metrics.record_transition("PUBLISHED", "CONFIRMED", 5)
        raise RuntimeError("rolled back")
    assert moved() == before + 1  # a rolled-back batch is read again and counted then

    # A savepoint that fails drops its own counts only; the enclosing block's survive.
    with metrics.deferred():
        metrics.record_transition("PUBLISHED", "CONFIRMED")
        with pytest.raises(RuntimeError), metrics.deferred():
            metrics.record_transition("PUBLISHED", "CONFIRMED", 10)
            raise RuntimeError("one record failed")
        metrics.record_quarantined("failed")
        assert moved() == before + 1
    assert moved() == before + 2
    assert value("relay_results_quarantined_total", reason="failed") >= 1


def test_deferred_holds_only_its_own_threads_counts() -> None:
    import threading

    def answered() -> float:
        return value("relay_observations_total", answer="present")

    before = answered()
    with metrics.deferred():
        other = threading.Thread(target=metrics.record_observation, args=("present",))
        other.start()
        other.join()
        assert answered() == before + 1  # the other thread is in no transaction of ours
        metrics.record_observation("present")
        assert answered() == before + 1
    assert answered() == before + 2


def test_reconciler_series_include_compensations_and_failed_results() -> None:
    metrics.prepare("reconciler")
    for name, labels in (
        ("relay_transitions_total", {"from_state": "NONE", "to_state": "PENDING"}),
        ("relay_results_quarantined_total", {"reason": "failed"}),
        ("relay_observations_total", {"answer": "error"}),
    ):
        assert REGISTRY.get_sample_value(name, labels) is not None, (name, labels)


def test_the_reconciler_has_a_port_of_its_own() -> None:
    url = "postgresql://x@127.0.0.1:1/x"
    default = load_settings(None, database_url=url)
    assert (default.metrics_port_of("relay"), default.metrics_port_of("reconciler")) == (9400, 9401)
    moved = load_settings(None, database_url=url, metrics_port=9500)
    assert moved.metrics_port_of("reconciler") == 9501
    explicit = load_settings(None, database_url=url, metrics_port=9500, reconcile_metrics_port=9600)
    assert explicit.metrics_port_of("reconciler") == 9600
    off = load_settings(None, database_url=url, metrics_port=0)
    assert off.metrics_port_of("reconciler") == 0
    only_reconciler = load_settings(
        None, database_url=url, metrics_port=0, reconcile_metrics_port=9
    )
    assert only_reconciler.metrics_port_of("reconciler") == 9
    with pytest.raises(ConfigError, match="reconcile_metrics_port"):
        load_settings(None, database_url=url, metrics_port=65535)


def test_a_taken_reconciler_port_is_named_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(
            None,
            database_url="postgresql://relay:pw@127.0.0.1:1/x",
            metrics_host="127.0.0.1",
            metrics_port=9400,
            reconcile_metrics_port=port,
        )
        with caplog.at_level(logging.ERROR):
            running = start_observability(settings, daemon="reconciler")
    assert running.server is None
    assert f"cannot serve metrics on 127.0.0.1:{port}" in caplog.text
    running.stop()
