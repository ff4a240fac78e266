"""The judge of every fault scenario: after the faults healed and the load drained, it compares
three records of what happened, per operation key:

- the outbox (``relay.effect`` and its attempts: state, the offset it was published at, which
  attempts ended provably unpublished: ``aborted``, ``not_sent``, ``released``, or checked
  ``absent``);
- what a ``read_committed`` consumer reads from each dispatch topic, start to end (and, for the
  report, how many records a ``read_uncommitted`` reader sees beyond them: the aborted writes the
  faults caused);
- the downstream bank's books, where the scenario runs it: net executions per business key.

Categories (the first six are the ones public Kafka fault analyses count):

- lost: the application committed the intent and it has no effect row; or the outbox says it was
  published (PUBLISHED / CONFIRMED) and no read_committed reader sees it; or it is CONFIRMED and
  the bank has not executed it;
- duplicated: read_committed sees the key more than once, or the bank executed it net more than
  once (executions minus reversals);
- aborted read: read_committed sees an attempt that the outbox records as provably not published
  (aborted, not sent, given back, or checked absent), which is what a reader of an aborted
  transaction would see; also an offset that disagrees with the one the outbox recorded;
- never seen: no record at all and the effect not published (still PENDING, DISPATCHING, ...);
- unknown / stuck: left UNKNOWN or STUCK at the end;
- unsettled: anything else not at its end state (an e-mail not PUBLISHED, a wire or reversal not
  CONFIRMED, REJECTED), or the bank executed a wire the outbox does not call CONFIRMED;
- redispatched: read_committed sees two attempts of the key because the reconciler re-dispatched
  it after its observer said "absent" while the first attempt was still on its way to the
  downstream (a downstream lagging past ``outcome_timeout_s``). That is the design's "absent ->
  re-dispatched", not a Kafka-hop duplicate; counted apart, and bad unless a scenario allows it.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import psycopg
from kafka import KafkaConsumer, TopicPartition

from relay.config import Settings
from tests.downstream import harness as h

CATEGORIES = (
    "lost",
    "duplicated",
    "aborted_read",
    "never_seen",
    "unknown",
    "stuck",
    "unsettled",
    "redispatched",
)
NOT_PUBLISHED = ("aborted", "not_sent", "released", "rejected")
TIMELINES = 5  # flagged keys whose timeline the report prints


@dataclass(frozen=True)
class Seen:
    partition: int
    offset: int
    effect_id: int | None
    attempt: int | None


@dataclass
class Report:
    scenario: str
    effects: int
    records: int
    aborted_writes: int
    attempts: Counter[str]
    bad: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    # Per flagged key, what each side recorded and when: a failure in CI explains itself.
    timelines: dict[str, list[str]] = field(default_factory=dict)

    def flag(self, category: str, key: str, why: str) -> None:
        self.bad[category][key] = why

    def counts(self) -> dict[str, int]:
        return {c: len(self.bad.get(c, {})) for c in CATEGORIES}

    def render(self, limit: int = 20) -> str:
        counts = self.counts()
        lines = [
            f"checker [{self.scenario}]: {self.effects} effects, {self.records} records read "
            f"read_committed, {self.aborted_writes} aborted writes invisible to it; "
            f"attempts {dict(sorted(self.attempts.items()))}",
            "  " + "  ".join(f"{c}={n}" for c, n in counts.items()),
        ]
        for category in CATEGORIES:
            for key, why in sorted(self.bad.get(category, {}).items())[:limit]:
                lines.append(f"  {category:<12} {key}: {why}")
        for key, events in sorted(self.timelines.items()):
            lines.append(f"  timeline of {key}:")
            lines.extend(f"    {event}" for event in events)
        return "\n".join(lines)

    def assert_clean(self, allowed: dict[str, str] | None = None) -> None:
        """No bad category, except those ``allowed`` (category -> why the scenario allows it)."""
        allowed = allowed or {}
        wrong = {c: n for c, n in self.counts().items() if n and c not in allowed}
        assert not wrong, f"{wrong}\n{self.render()}"


def _read_topic(bootstrap: str, topic: str, isolation: str) -> list[tuple[str, Seen]]:
    """Every record of ``topic`` from the start to its end as of now."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        enable_auto_commit=False,
        isolation_level=isolation,
        group_id=None,
    )
    out: list[tuple[str, Seen]] = []
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return out
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + 120
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end {ends}"
            for records in consumer.poll(timeout_ms=500, max_records=5000).values():
                for r in records:
                    headers = {k: v.decode() for k, v in r.headers}
                    effect_id = headers.get("relay_effect_id")
                    attempt = headers.get("relay_attempt")
                    out.append(
                        (
                            r.key.decode(),
                            Seen(
                                r.partition,
                                r.offset,
                                int(effect_id) if effect_id else None,
                                int(attempt) if attempt else None,
                            ),
                        )
                    )
    finally:
        consumer.close()
    return out


def check(
    scenario: str,
    database_url: str,
    bootstrap: str,
    settings: Settings,
    committed: set[str],
    bank: h.Downstream | None = None,
) -> Report:
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Intents of published batches have no effect row, attempt or transition (issue 19).
        effects = conn.execute(
            "SELECT id, operation_key, effect_type, state, business_key, published_partition,"
            " published_offset, reason FROM relay.effect"
            " UNION ALL SELECT id, operation_key, effect_type, 'PUBLISHED', business_key,"
            ' partition, "offset", NULL FROM relay.published_effect'
        ).fetchall()
        observed_absent = {
            str(row[0])
            for row in conn.execute(
                "SELECT DISTINCT operation_key FROM relay.evidence WHERE kind = 'observation'"
                " AND outcome = 'absent' AND verdict = 'applied'"
            ).fetchall()
        }
        attempts = conn.execute(
            "SELECT effect_id, attempt, coalesce(outcome, 'open'), verification FROM relay.attempt"
            " UNION ALL SELECT id, 1, 'acked', NULL FROM relay.published_effect"
        ).fetchall()
    unpublished: set[tuple[int, int]] = set()
    outcomes: Counter[str] = Counter()
    for effect_id, attempt, outcome, verification in attempts:
        outcomes[str(outcome)] += 1
        if outcome in NOT_PUBLISHED or str(verification or "").startswith("absent"):
            unpublished.add((int(effect_id), int(attempt)))

    seen: dict[str, list[Seen]] = defaultdict(list)
    records = aborted_writes = 0
    for topic in sorted({spec.topic for spec in settings.effect_types.values()}):
        committed_reads = _read_topic(bootstrap, topic, "read_committed")
        records += len(committed_reads)
        aborted_writes += len(_read_topic(bootstrap, topic, "read_uncommitted")) - len(
            committed_reads
        )
        for key, record in committed_reads:
            seen[key].append(record)

    booked: Counter[str] = Counter()
    executed: set[str] = set()
    if bank is not None:
        for kind, key, business_key, _attempt in bank.books():
            booked[str(business_key)] += 1 if kind == "wire" else -1
            if kind == "wire":
                executed.add(key)

    report = Report(scenario, len(effects), records, aborted_writes, outcomes)
    keys = set()
    awaiting = {n for n, s in settings.effect_types.items() if s.result_topic}
    for _id, key, effect_type, state, business_key, partition, offset, why in effects:
        keys.add(key)
        reads = seen.get(key, [])
        published = state in ("PUBLISHED", "CONFIRMED")
        if published and not reads:
            report.flag("lost", key, f"{state} at {partition}/{offset}, never read")
        per_attempt = Counter(r.attempt for r in reads)
        if any(n > 1 for n in per_attempt.values()) or (
            len(per_attempt) > 1 and key not in observed_absent
        ):
            report.flag("duplicated", key, f"read {len(reads)} times: {reads}")
        elif len(per_attempt) > 1:
            report.flag("redispatched", key, f"observed absent, then read {len(reads)} times")
        for r in reads:
            if (r.effect_id, r.attempt) in unpublished:
                report.flag("aborted_read", key, f"attempt {r.attempt} read although not published")
            elif (
                partition is not None
                and len(reads) == 1
                and (r.partition, r.offset) != (partition, offset)
            ):
                # (No offset recorded: settled on other evidence, e.g. the bank's books.)
                report.flag("aborted_read", key, f"read at {r}, outbox says {partition}/{offset}")
        if not reads and not published:
            report.flag("never_seen", key, f"left {state}")
        if state == "UNKNOWN":
            report.flag("unknown", key, f"left UNKNOWN: {why}")
        elif state == "STUCK":
            report.flag("stuck", key, f"left STUCK: {why}")
        elif state != ("CONFIRMED" if effect_type in awaiting else "PUBLISHED"):
            report.flag("unsettled", key, f"left {state}")
        if bank is not None and effect_type == "wire":
            net = booked.get(str(business_key), 0)
            if state == "CONFIRMED" and net < 1:
                report.flag("lost", key, f"CONFIRMED, the bank's net executions {net}")
            if net > 1:
                report.flag("duplicated", key, f"the bank executed it net {net} times")
            if key in executed and state != "CONFIRMED":
                report.flag("unsettled", key, f"executed by the bank, left {state}")
    for key in sorted(committed - keys):
        report.flag("lost", key, "committed by the application, no effect row")
    flagged = sorted({k for per_key in report.bad.values() for k in per_key})[:TIMELINES]
    report.timelines = {key: timeline(database_url, key, bank) for key in flagged}
    print("\n" + report.render())
    return report


def timeline(database_url: str, key: str, bank: h.Downstream | None) -> list[str]:
    """What the outbox, the reconciler and the bank recorded about ``key``, in time order."""
    events: list[tuple[float, str]] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        for at, from_state, to_state, actor, reason in conn.execute(
            "SELECT extract(epoch FROM l.at)::float8, l.from_state, l.to_state, l.actor, l.reason"
            " FROM relay.transition_log l JOIN relay.effect e ON e.id = l.effect_id"
            " WHERE e.operation_key = %s ORDER BY l.transition_id, l.part",
            (key,),
        ).fetchall():
            events.append((at, f"outbox     {from_state} -> {to_state} by {actor}: {reason}"))
        for at, kind, outcome, topic, offset, verdict, reason in conn.execute(
            'SELECT extract(epoch FROM received_at)::float8, kind, outcome, topic, "offset",'
            " verdict, reason FROM relay.evidence WHERE operation_key = %s ORDER BY id",
            (key,),
        ).fetchall():
            where = f" from {topic}@{offset}" if topic else ""
            events.append((at, f"evidence   {kind} {outcome}{where}: {verdict} ({reason})"))
    if bank is not None:
        for at, what in bank.history(key):
            events.append((at, f"bank       {what}"))
    start = min((at for at, _ in events), default=0.0)
    return [f"+{at - start:7.2f}s {text}" for at, text in sorted(events, key=lambda e: e[0])]
