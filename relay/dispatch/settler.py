"""The settling of batches left without an outcome, by the receipts their transactions carried.

A maintenance service of the relay: the daemon calls :meth:`Settler.run_once` before it expires
leases. A batch claimed by an incarnation that writes receipts (``relay.receipt_writer``) and
left without an outcome (its replica died, or the outcome was lost) is settled with one read of
the receipts topic, after fencing the producer that could still commit it: a receipt names the
batch, so its transaction committed and each intent is PUBLISHED where the receipt says (an
intent the receipt does not list was never sent, and goes again); no receipt names it, so the
transaction was aborted and every intent goes again, at once and without a try spent. Nothing
becomes UNKNOWN and nothing is searched for in the dispatch topics. A batch that cannot be
settled this way (Kafka unreachable, records of its time deleted by retention, a receipt with
a part missing) is left to lease expiry, which makes its intents UNKNOWN for the
per-record search (``verifier.py``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from kafka import TopicPartition
from kafka import errors as kerr

from relay import observability
from relay.config import Settings
from relay.dispatch.lookup import (
    Reader,
    may_have_deleted,
    open_consumer,
    read_ranges,
    settled_ends,
    time_windows,
    window_ranges,
)
from relay.dispatch.outcomes import STATE_AFTER, AttemptOutcome
from relay.dispatch.publisher import key_partition
from relay.dispatch.receipts import Receipt, parse_receipt, receipt_bound_s
from relay.dispatch.stage import Identity
from relay.dispatch.transactions import fence, transactional_id
from relay.errors import ReceiptsUnreadableError, describe
from relay.sql import query

log = logging.getLogger(__name__)

SETTLE_ROUND = 100  # batches settled per round at most


class _Batch(NamedTuple):
    """A batch to settle (columns of batches_to_settle)."""

    id: int
    owner: str
    owner_epoch: int
    claimed_at: datetime
    ids: list[int]
    topic: str
    install: str
    window_s: float  # the latest its writer sends a receipt after the claim


@dataclass(frozen=True)
class Committed:
    """The batch's transaction committed: where each record of it lies (effect -> partition,
    offset, for the attempt the batch made)."""

    placed: dict[int, tuple[int, int]]


@dataclass(frozen=True)
class NotCommitted:
    """No receipt names the batch, read after fencing: its transaction did not commit."""

    scanned: int


@dataclass
class Settled:
    """What one round did: batches settled as committed or not, intents published or to go
    again, and batches left to lease expiry (with why)."""

    committed: int = 0
    aborted: int = 0
    published: int = 0
    again: int = 0
    left: int = 0
    why: list[str] = field(default_factory=list)
    settled: set[int] = field(default_factory=set)  # the batches recorded
    deferred: int = 0  # not reached before the round's deadline: the next round's


def receipt_windows(
    settings: Settings, batches: Sequence[tuple[datetime, int]], window_s: float
) -> list[tuple[int, int, list[int]]]:
    """When each batch's receipt can have been written (epoch ms), overlapping windows merged:
    from its claim to the latest its writer sends one (``window_s``, recorded by the writer; a
    publisher past it aborts instead, see ``receipts.receipt_bound_s``), widened by the clock
    skew on both sides. The wider of the writer's bound and this relay's."""
    longest_s = max(window_s, receipt_bound_s(settings.lease_s, settings.publish_timeout_s))
    return time_windows(batches, int(settings.clock_skew_s * 1000), int(longest_s * 1000))


def find_receipts(
    reader: Reader,
    settings: Settings,
    writer: tuple[str, int, str, str, float],
    batches: Sequence[tuple[datetime, int]],
) -> dict[int, Committed | NotCommitted]:
    """Whether each batch's transaction committed, from the receipts of one incarnation
    (``writer``: replica, epoch, topic, installation, window); its producer must be fenced. A
    batch is missing from the answer when its receipt has a part that could not be read; raises
    ReceiptsUnreadableError when absence would prove nothing (the topic is missing, records of a
    window may have been deleted), KafkaError when Kafka cannot answer."""
    replica, epoch, topic, install, window_s = writer
    key = transactional_id(replica).encode()
    stall_s = settings.publish_timeout_s
    partitions = reader.committed.partitions_for_topic(topic)
    if not partitions:
        # Deleted (and so its receipts), or never created: absence would prove nothing.
        raise ReceiptsUnreadableError(f"the receipts topic {topic!r} does not exist")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    ends = settled_ends(reader, tps, stall_s)
    wanted = {batch for _, batch in batches}
    parts: dict[str, dict[int, Receipt]] = {}  # transaction -> part -> receipt
    txn_of: dict[int, str] = {}  # batch -> the transaction whose receipt names it

    def visit(partition: int, record: Any) -> bool:
        if record.key != key:
            return False
        receipt = parse_receipt(record.value)
        if receipt is None:
            log.warning(
                "a record of the receipts topic is not a receipt; skipped",
                extra={"topic": topic, "partition": partition, "offset": record.offset},
            )
            return False
        if (receipt.install, receipt.replica, receipt.epoch) != (install, replica, epoch):
            return False  # another installation's, or another incarnation's
        if not wanted.intersection(receipt.batches):
            return False
        parts.setdefault(receipt.txn, {})[receipt.part] = receipt
        for batch in wanted.intersection(receipt.batches):
            txn_of[batch] = receipt.txn
        return all(
            batch in txn_of and len(parts[txn_of[batch]]) == _parts(parts[txn_of[batch]])
            for batch in wanted
        )

    scanned = 0
    try:
        home = TopicPartition(topic, key_partition(key, sorted(partitions)))
        for start_ms, end_ms, _ in receipt_windows(settings, batches, window_s):
            # Offsets by time assume timestamps that rise with offsets; a receipt appended after
            # a record stamped later (another writer's clock ahead, a retried send) is read too.
            late_ms = int((settings.clock_skew_s + settings.publish_timeout_s) * 1000)
            ranges = window_ranges(reader, tps, ends, start_ms, end_ms + late_ms)
            scanned += read_ranges(reader, ranges, stall_s, visit)
            # Where the log starts once the window is read (a deletion during the read is seen).
            begins = reader.uncommitted.beginning_offsets([home])
            _check_retained(reader, home, begins, ends, start_ms)
    finally:
        reader.committed.unsubscribe()
    answers: dict[int, Committed | NotCommitted] = {}
    for batch in wanted:
        txn = txn_of.get(batch)
        if txn is None:
            answers[batch] = NotCommitted(scanned)
            continue
        received = parts[txn]
        if len(received) != _parts(received):
            continue  # committed, but where each record lies is not all known: left
        answers[batch] = Committed(
            {
                line.effect_id: (line.partition, line.offset)
                for receipt in received.values()
                for line in receipt.lines
                if line.attempt == 1  # a batch makes the first attempt of each of its intents
            }
        )
    return answers


def _parts(received: dict[int, Receipt]) -> int:
    return next(iter(received.values())).parts


def _check_retained(
    reader: Reader,
    tp: TopicPartition,
    begins: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
    start_ms: int,
) -> None:
    """Absence proves nothing where retention may have deleted records of the window: the
    writer's partition (its key's, at the topic's partition count), if its log no longer starts
    at 0, must keep a record older than the window. Other partitions are read but not checked:
    an idle one emptied by retention would otherwise stop all settling; a receipt lies in
    another partition only if the count changed (docs/deployment.md: keep it)."""
    if may_have_deleted(reader, tp, begins[tp], ends[tp], start_ms):
        raise ReceiptsUnreadableError(
            f"records of partition {tp.partition} of the receipts topic {tp.topic!r} from "
            "the time of the batch may have been deleted (retention)"
        )


class Settler:
    """Settles batches left without an outcome, a round at a time (see the module docstring).

    ``producer_ready`` says whether this replica's transactional producer is initialised (which
    fenced its earlier ones, and has no transaction open between two publishes)."""

    def __init__(
        self,
        settings: Settings,
        who: Identity,
        *,
        producer_ready: Callable[[], bool],
        between: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.who = who
        self._producer_ready = producer_ready
        # Called between two writers' reads: the daemon's heartbeat, which this round must not
        # hold back (a fence and a read can take seconds each).
        self._between = between

    def run_once(self, conn: psycopg.Connection[Any], unanswered: Sequence[int] = ()) -> Settled:
        """One round: the batches to settle, one read of receipts per producer, the outcomes.
        ``unanswered``: this incarnation's batches whose commit went unanswered (the producer
        that made them must have been replaced since)."""
        rows = conn.execute(
            query("batches_to_settle"),
            {
                "owner": self.who.replica_id,
                "epoch": self.who.epoch,
                "lease_s": self.settings.lease_s,
                "limit": SETTLE_ROUND,
                "unanswered": list(unanswered),
            },
        ).fetchall()
        done = Settled()
        if not rows:
            return done
        by_writer: dict[tuple[str, int, str, str, float], list[_Batch]] = {}
        for row in rows:
            b = _Batch(*row)
            writer = (b.owner, b.owner_epoch, b.topic, b.install, b.window_s)
            by_writer.setdefault(writer, []).append(b)
        try:
            reader = open_consumer(self.settings, auto_create=False)
        except kerr.KafkaError as exc:
            done.left, done.why = len(rows), [describe(exc)]
            observability.record_settled("left", done.left)
            return done
        deadline = time.monotonic() + self.settings.lease_s / 4
        read = 0
        try:
            for writer, batches in by_writer.items():
                if read and time.monotonic() > deadline:
                    done.deferred += len(batches)  # the publishing thread has work too
                    continue
                read += 1
                try:
                    answers = self._read(reader, writer, batches)
                except (kerr.KafkaError, OSError, ReceiptsUnreadableError) as exc:
                    done.left += len(batches)
                    done.why.append(f"replica {writer[0]}: {describe(exc)}")
                    self._between()
                    continue
                self._between()
                try:
                    with conn.transaction():
                        self._record(conn, writer[0], writer[1], batches, answers, done)
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    # Not recorded; left to lease expiry rather than tried again forever.
                    done.left += len(batches)
                    done.why.append(f"replica {writer[0]}: {describe(exc)}")
        finally:
            reader.close()
        observability.record_settled("left", done.left)
        if done.left:
            log.warning(
                "batches left without an outcome could not be settled by their receipts; "
                "their intents become UNKNOWN, to be looked for one by one",
                extra={"count": done.left, "reason": "; ".join(done.why)},
            )
        return done

    def _read(
        self, reader: Reader, writer: tuple[str, int, str, str, float], batches: list[_Batch]
    ) -> dict[int, Committed | NotCommitted]:
        """Fence the producer that made the batches (ours is, once initialised), then read."""
        owner = writer[0]
        if owner == self.who.replica_id:
            if not self._producer_ready():
                raise ReceiptsUnreadableError("this replica's producer is not initialised yet")
        else:
            fence(self.settings, owner)
        return find_receipts(reader, self.settings, writer, [(b.claimed_at, b.id) for b in batches])

    def _record(
        self,
        conn: psycopg.Connection[Any],
        owner: str,
        epoch: int,
        batches: list[_Batch],
        answers: dict[int, Committed | NotCommitted],
        done: Settled,
    ) -> None:
        """Each answered batch's intents written as the marker writes a batch's outcomes, in the
        name of the incarnation that made the attempt (compare-and-set on it: a batch settled or
        expired meanwhile writes nothing)."""
        ids: list[int] = []
        of: list[int] = []
        outcomes: list[AttemptOutcome] = []
        reasons: list[str] = []
        partitions: list[int | None] = []
        offsets: list[int | None] = []
        for b in batches:
            answer = answers.get(b.id)
            if answer is None:
                done.left += 1
                done.why.append(f"batch {b.id}: a part of its receipt could not be read")
                continue
            for effect_id in b.ids:
                ids.append(effect_id)
                of.append(b.id)
                if isinstance(answer, NotCommitted):
                    outcomes.append(AttemptOutcome.ABORTED)
                    reasons.append(
                        f"transaction aborted, nothing visible: no receipt names batch {b.id} "
                        f"after fencing the producer of replica {owner} (its transaction did "
                        "not commit); it goes again"
                    )
                    partitions.append(None)
                    offsets.append(None)
                elif effect_id in answer.placed:
                    partition, offset = answer.placed[effect_id]
                    outcomes.append(AttemptOutcome.ACKED)
                    reasons.append(
                        f"acknowledged by Kafka: partition {partition} offset {offset} (read "
                        f"from the receipt of batch {b.id}'s transaction)"
                    )
                    partitions.append(partition)
                    offsets.append(offset)
                else:
                    outcomes.append(AttemptOutcome.NOT_SENT)
                    reasons.append(
                        f"not sent: not among the records of batch {b.id}'s committed "
                        "transaction (its receipt lists them); it goes again"
                    )
                    partitions.append(None)
                    offsets.append(None)
        if not ids:
            return
        states = [STATE_AFTER[o].value for o in outcomes]
        rows = conn.execute(
            query("mark_batch_outcomes"),
            {
                "owner": owner,
                "epoch": epoch,
                "actor": self.who.replica_id,
                "ids": ids,
                "batches": of,
                "states": states,
                "outcomes": [o.value for o in outcomes],
                "reasons": reasons,
                "partitions": partitions,
                "offsets": offsets,
                "delays_s": [0.0] * len(ids),
            },
        ).fetchall()
        written = {int(row[0]) for row in rows}
        counts = Counter(s for i, s in zip(ids, states, strict=True) if i in written)
        observability.record_marked(counts)
        committed = {b.id for b in batches if isinstance(answers.get(b.id), Committed)}
        aborted = {b.id for b in batches if isinstance(answers.get(b.id), NotCommitted)}
        done.committed += len(committed)
        done.aborted += len(aborted)
        observability.record_settled("committed", len(committed))
        observability.record_settled("aborted", len(aborted))
        done.settled.update(committed | aborted)
        done.published += counts.get("PUBLISHED", 0)
        done.again += counts.get("PENDING", 0)
        log.info(
            "settled batches left without an outcome by their receipts",
            extra={
                "replica": owner,
                "committed": len(committed),
                "aborted": len(aborted),
                "published": counts.get("PUBLISHED", 0),
                "again": counts.get("PENDING", 0),
            },
        )
