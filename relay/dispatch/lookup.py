"""Are ambiguous attempts' records in Kafka? Read them back, read_committed, after fencing.

An attempt's records carry a producer timestamp taken while the attempt ran, so the search is
bounded to the attempt's window (started_at - skew .. started_at + the longest the attempt could
have lasted + skew), over every partition of the topic: a record is found even if the topic's
partition count changed since. The attempts of one round are searched together: overlapping
windows merge into one range that is read once, so a burst of UNKNOWN attempts (a crash, a
broker cut) costs one pass over the topic's recent records, not one pass per attempt. The
producers that made the attempts must be fenced before the search, or an open transaction could
still commit after the search said "absent"; and the search reads only once every transaction
below each partition's end is decided, or a committed record that a read_committed consumer
cannot see yet (another producer's earlier transaction still open on its partition, a new
leader catching up) would be called absent and published again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from kafka import KafkaConsumer, TopicPartition

from relay.config import Settings
from relay.dispatch.publisher import key_partition
from relay.dispatch.transactions import TransactionTimeoutError
from relay.headers import H_ATTEMPT, H_EFFECT_ID, H_TRANSITION_ID
from relay.kafka_client import kafka_security

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wanted:
    """One attempt to look for."""

    key: str  # the record's Kafka key (the operation key, or the reported one's for a status)
    effect_id: int
    attempt: int
    started_at: datetime
    transition_id: int | None = None  # a status event: the transition it reports (not attempt)
    partition_key: str | None = None  # what chose its partition, when not its key (its group)

    def matches(self, headers: dict[str, bytes]) -> bool:
        if headers.get(H_EFFECT_ID) != str(self.effect_id).encode():
            return False
        if self.transition_id is not None:
            return headers.get(H_TRANSITION_ID) == str(self.transition_id).encode()
        return headers.get(H_ATTEMPT) == str(self.attempt).encode()


@dataclass(frozen=True)
class Found:
    partition: int
    offset: int


@dataclass(frozen=True)
class Unprovable:
    """Not found, but its absence proves nothing: retention may have deleted records of the
    attempt's time from the partition it went to."""

    reason: str


@dataclass(frozen=True)
class Absent:
    partitions: int
    scanned: int


class Reader:
    """The two consumers of a search, without a group, reused for the checks of one round.

    ``committed`` (read_committed) reads the records; ``uncommitted`` (read_uncommitted) tells
    where the log ends. A read_committed consumer sees offsets, even by timestamp, only below
    the partition's last stable offset: a record of a committed transaction stays invisible to
    it while any other transaction that began earlier on that partition is open, or while its
    leader has not caught up. Reading it then would call the record absent."""

    def __init__(self, settings: Settings, *, auto_create: bool = True) -> None:
        common: dict[str, Any] = {
            **kafka_security(settings),
            # Off for the receipts topic: asking for a missing one must not create it empty.
            "allow_auto_create_topics": auto_create,
            "client_id": f"relay-verify-{settings.replica_id}",
            "group_id": None,
            "enable_auto_commit": False,
            "request_timeout_ms": int(min(settings.publish_timeout_s, 30.0) * 1000),
            "bootstrap_timeout_ms": int(min(settings.publish_timeout_s, 10.0) * 1000),
            "max_partition_fetch_bytes": max(1_048_576, settings.max_message_bytes * 2),
        }
        self._settings = settings
        self._retention: dict[str, Retention] = {}
        self.committed = KafkaConsumer(**common, isolation_level="read_committed")
        try:
            self.uncommitted = KafkaConsumer(**common, isolation_level="read_uncommitted")
        except BaseException:
            self.committed.close()
            raise

    def retention(self, topic: str) -> Retention:
        """What may delete the topic's records (asked once per reader); UNKNOWN_RETENTION when
        the topic's configuration cannot be read (a principal without DescribeConfigs on it)."""
        known = self._retention.get(topic)
        if known is None:
            known = self._retention[topic] = _describe_retention(self._settings, topic)
        return known

    def close(self) -> None:
        try:
            self.committed.close()
        finally:
            self.uncommitted.close()


@dataclass(frozen=True)
class Retention:
    """What may delete a topic's records: retention by time (``ms``; None: never), by size,
    compaction (which removes records without moving the log start)."""

    ms: int | None
    by_size: bool
    compacts: bool

    def may_reach(self, start_ms: int, now_ms: int) -> bool:
        """Whether records from ``start_ms`` on may be gone by now without the relay."""
        by_time = self.ms is not None and start_ms < now_ms - self.ms
        return self.by_size or self.compacts or by_time


# A topic whose configuration cannot be read: records may be deleted by time or size at any
# moment, and the log start decides. Compaction is not assumed: dispatch topics must not be
# compacted (docs/unknown.md), and assuming it would make every absence there unprovable.
UNKNOWN_RETENTION = Retention(ms=0, by_size=True, compacts=False)


def _describe_retention(settings: Settings, topic: str) -> Retention:
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    wanted = {"retention.ms": None, "retention.bytes": None, "cleanup.policy": None}
    try:
        admin = KafkaAdminClient(
            **kafka_security(settings),
            client_id=f"relay-verify-{settings.replica_id}",
            request_timeout_ms=int(min(settings.publish_timeout_s, 30.0) * 1000),
        )
        try:
            described = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, wanted)], config_filter="all"
            )
        finally:
            admin.close()
        config = {k: v["value"] for k, v in described["topic"][topic].items()}
        ms = int(config["retention.ms"])
        return Retention(
            ms=None if ms < 0 else ms,
            by_size=int(config["retention.bytes"]) >= 0,
            compacts="compact" in str(config["cleanup.policy"]),
        )
    except Exception as exc:  # noqa: BLE001 - unknown: assume anything may be deleted
        log.warning(
            "cannot read the retention of topic %r (%s): an attempt not found there is not "
            "taken as absent where its log has moved",
            topic,
            exc,
        )
        return UNKNOWN_RETENTION


def open_consumer(settings: Settings, *, auto_create: bool = True) -> Reader:
    return Reader(settings, auto_create=auto_create)


def find_attempt(
    consumer: Reader,
    settings: Settings,
    *,
    topic: str,
    key: str,
    effect_id: int,
    attempt: int,
    started_at: datetime,
    timeout_s: float,
) -> Found | Absent | Unprovable:
    """Search the topic for one attempt's record. Raises KafkaError when Kafka can't answer."""
    wanted = Wanted(key, effect_id, attempt, started_at)
    return find_attempts(consumer, settings, topic, [wanted], timeout_s)[wanted]


def find_attempts(
    consumer: Reader,
    settings: Settings,
    topic: str,
    wanted: Sequence[Wanted],
    stall_s: float,
    deadline: float | None = None,
) -> dict[Wanted, Found | Absent | Unprovable]:
    """Search the topic for the records of several attempts at once; their producers are fenced.
    An attempt not found is Absent unless records of its time may be gone without the relay:
    the topic's retention (by size, by compaction, or by time reaching the window) and each
    partition it can have gone to (its partition key's, at any partition count up to today's)
    no longer holding a record older than the window; then it is Unprovable.

    Raises KafkaError when Kafka can't answer, including a read that makes no progress for
    ``stall_s`` (a large range is fine as long as records keep coming) and a partition whose
    transactions below its end are not all decided within ``stall_s``. Past ``deadline``
    (``time.monotonic()``), no further time window is read once one has been: the attempts of
    the windows not read have no verdict in the answer."""
    verdicts: dict[Wanted, Found | Absent | Unprovable] = {}
    try:
        partitions = consumer.committed.partitions_for_topic(topic)
        if not partitions:
            return {w: Absent(partitions=0, scanned=0) for w in wanted}
        ordered = sorted(partitions)
        tps = [TopicPartition(topic, p) for p in ordered]
        ends = settled_ends(consumer, tps, stall_s)
        skew_ms = int(settings.clock_skew_s * 1000)  # the broker's clock against ours
        for start_ms, end_ms, group in _merged_windows(settings, wanted):
            if verdicts and deadline is not None and time.monotonic() > deadline:
                break
            found, scanned = _scan(consumer, tps, ends, start_ms, end_ms, group, stall_s)
            # Where each log starts once the window is read: records deleted during the read
            # (a fetch past the log start jumps to its end) are then seen as possibly deleted.
            begins: dict[TopicPartition, int] = {}
            deleted: dict[int, bool] = {}  # partition -> may have lost records of the window
            for w in group:
                hit = found.get(w)
                if hit is not None:
                    verdicts[w] = hit
                    continue
                retention = consumer.retention(topic)
                if not retention.may_reach(start_ms - skew_ms, int(time.time() * 1000)):
                    verdicts[w] = Absent(partitions=len(tps), scanned=scanned)
                    continue
                homes = _homes((w.partition_key or w.key).encode(), ordered)
                if not begins:
                    begins = consumer.uncommitted.beginning_offsets(tps)
                for home in homes - deleted.keys():
                    tp = TopicPartition(topic, home)
                    deleted[home] = retention.compacts or may_have_deleted(
                        consumer, tp, begins[tp], ends[tp], start_ms
                    )
                lost = sorted(h for h in homes if deleted[h])
                verdicts[w] = (
                    Unprovable(
                        f"not found, but records of partition(s) {lost} of {topic!r} from the "
                        "time of the attempt may have been deleted (retention): absence proves "
                        "nothing"
                    )
                    if lost
                    else Absent(partitions=len(tps), scanned=scanned)
                )
        return verdicts
    finally:
        consumer.committed.unsubscribe()


def settled_ends(
    consumer: Reader, tps: list[TopicPartition], stall_s: float
) -> dict[TopicPartition, int]:
    """Each partition's end (high watermark), once every transaction below it is decided.

    Taken after the fencing, the end lies past every record the fenced producers wrote (acks=all);
    once the last stable offset has reached it, the commit or abort of each of their transactions
    is written there and a read_committed read up to it sees exactly the committed records."""
    ends: dict[TopicPartition, int] = consumer.uncommitted.end_offsets(tps)
    deadline = time.monotonic() + stall_s
    while True:
        stable = consumer.committed.end_offsets(tps)
        behind = {tp.partition: (stable[tp], ends[tp]) for tp in tps if stable[tp] < ends[tp]}
        if not behind:
            return ends
        if time.monotonic() > deadline:
            raise TransactionTimeoutError(
                "transactions below the end of the log are still undecided after "
                f"{stall_s:.1f}s (partition: (last stable offset, end)): {behind}"
            )
        time.sleep(0.05)


def _homes(by: bytes, ordered: Sequence[int]) -> set[int]:
    """The partitions a record keyed ``by`` went to at any partition count up to today's
    (partitions are only ever added: the first ``n`` of today's)."""
    return {key_partition(by, ordered[:n]) for n in range(1, len(ordered) + 1)}


def may_have_deleted(
    reader: Reader, tp: TopicPartition, begin: int, end: int, start_ms: int
) -> bool:
    """Whether retention may have deleted records of the partition from ``start_ms`` on: its log
    no longer starts at 0, and it keeps no record older than that time (empty, or its first
    record kept is the first at or after it)."""
    if begin == 0:
        return False
    first = reader.uncommitted.offsets_for_times({tp: start_ms}).get(tp)
    if first is None:
        return begin >= end
    return bool(first.offset <= begin)


def time_windows(
    starts: Iterable[tuple[datetime, T]], skew_ms: int, longest_ms: int
) -> list[tuple[int, int, list[T]]]:
    """Each item's window (epoch ms: its start - skew .. + longest + skew), overlapping ones
    merged into one, in order."""
    windows = sorted(
        ((int(at.timestamp() * 1000) - skew_ms, item) for at, item in starts), key=lambda x: x[0]
    )
    merged: list[tuple[int, int, list[T]]] = []
    for start_ms, item in windows:
        end_ms = start_ms + longest_ms + 2 * skew_ms
        if merged and start_ms <= merged[-1][1]:
            first, last, group = merged[-1]
            group.append(item)
            merged[-1] = (first, max(last, end_ms), group)
        else:
            merged.append((start_ms, end_ms, [item]))
    return merged


def _merged_windows(
    settings: Settings, wanted: Iterable[Wanted]
) -> list[tuple[int, int, list[Wanted]]]:
    """The attempts' time windows (epoch ms), overlapping ones merged into one."""
    return time_windows(
        ((w.started_at, w) for w in wanted),
        int(settings.clock_skew_s * 1000),
        int((settings.publish_timeout_s * 2 + settings.transaction_timeout_s) * 1000),
    )


def window_ranges(
    reader: Reader,
    tps: list[TopicPartition],
    settled: dict[TopicPartition, int],
    start_ms: int,
    end_ms: int,
) -> dict[TopicPartition, tuple[int, int]]:
    """The offsets of each partition's records from start_ms to end_ms, below its settled end.
    Offsets by time come from the whole log, not only its stable part."""
    starts = reader.uncommitted.offsets_for_times({tp: start_ms for tp in tps})
    ends = reader.uncommitted.offsets_for_times({tp: end_ms for tp in tps})
    ranges: dict[TopicPartition, tuple[int, int]] = {}
    for tp in tps:
        begin = starts.get(tp)
        if begin is None:
            continue  # no record at or after the window's start
        end = ends.get(tp)
        stop = min(end.offset, settled[tp]) if end is not None else settled[tp]
        if stop > begin.offset:
            ranges[tp] = (begin.offset, stop)
    return ranges


def read_ranges(
    reader: Reader,
    ranges: dict[TopicPartition, tuple[int, int]],
    stall_s: float,
    visit: Callable[[int, Any], bool],
) -> int:
    """Read the ranges read_committed, calling ``visit(partition, record)`` for each record
    until it answers True (all found); returns how many records were read."""
    if not ranges:
        return 0
    consumer = reader.committed
    consumer.assign(list(ranges))
    for tp, (begin, _) in ranges.items():
        consumer.seek(tp, begin)
    scanned = 0
    remaining = dict(ranges)
    positions: dict[TopicPartition, int] = {}
    last_progress = time.monotonic()
    done = False
    while remaining and not done:
        if time.monotonic() - last_progress > stall_s:
            raise TransactionTimeoutError(
                f"the search made no progress for {stall_s:.1f}s ({scanned} records read)"
            )
        batch = consumer.poll(timeout_ms=200, max_records=5000)
        for tp, records in batch.items():
            last_progress = time.monotonic()
            for record in records:
                scanned += 1
                if visit(tp.partition, record):
                    done = True
        for tp in list(remaining):
            position = consumer.position(tp)
            if position != positions.get(tp):
                positions[tp] = position  # also moves over aborted records and markers
                last_progress = time.monotonic()
            if position >= remaining[tp][1]:
                del remaining[tp]
    return scanned


def _scan(
    reader: Reader,
    tps: list[TopicPartition],
    settled: dict[TopicPartition, int],
    start_ms: int,
    end_ms: int,
    wanted: list[Wanted],
    stall_s: float,
) -> tuple[dict[Wanted, Found], int]:
    """Read every partition from start_ms to end_ms (and below its settled end) once, matching
    the wanted attempts."""
    by_key: dict[bytes, list[Wanted]] = {}
    for w in wanted:
        by_key.setdefault(w.key.encode(), []).append(w)
    found: dict[Wanted, Found] = {}

    def visit(partition: int, record: Any) -> bool:
        candidates = by_key.get(record.key) if record.key is not None else None
        if candidates:
            headers = dict(record.headers)
            for w in candidates:
                if w.matches(headers):
                    found.setdefault(w, Found(partition=partition, offset=record.offset))
        return len(found) >= len(wanted)

    ranges = window_ranges(reader, tps, settled, start_ms, end_ms)
    scanned = read_ranges(reader, ranges, stall_s, visit)
    return found, scanned
