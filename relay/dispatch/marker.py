"""The marker stage: records how each attempt of a batch ended, behind the publisher.

Its decisions (the state after an outcome, the reason recorded, when retries give up, how long a
provably unsent effect waits) are plain functions below, so they can be checked without a
database; the stage itself only writes them, one set-based statement per batch.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg

from relay import observability
from relay.config import Settings
from relay.dispatch.outcomes import STATE_AFTER, AttemptOutcome
from relay.dispatch.publisher import PublishResult
from relay.dispatch.stage import HANDOFF_POLL_S, Held, Identity, Stage
from relay.errors import describe
from relay.sql import query
from relay.states import EffectState

log = logging.getLogger(__name__)


class Marker(Stage):
    """Records how each attempt of a batch ended, in one statement per batch.

    A database outage is waited out until the batch's lease would end (compare-and-set makes
    retries safe); after that the lease expiry makes the attempts UNKNOWN."""

    name = "marker"

    def __init__(
        self,
        settings: Settings,
        who: Identity,
        held: Held,
        stop: threading.Event,
        on_marked: Callable[[Sequence[PublishResult]], None] | None = None,
    ):
        super().__init__(settings, who, held, stop)
        self.inbox: queue.Queue[tuple[Sequence[PublishResult], float]] = queue.Queue(maxsize=2)
        self._closing = threading.Event()
        self._current: tuple[Sequence[PublishResult], float] | None = None
        self._on_marked = on_marked

    def submit(self, results: Sequence[PublishResult], claimed_at: float) -> None:
        """Blocks while two batches already wait: the publisher cannot run far ahead."""
        if results:
            self.inbox.put((results, claimed_at))

    def close(self, timeout_s: float) -> None:
        """Mark everything submitted, then end the thread."""
        self._closing.set()
        self.thread.join(timeout_s)

    def finished(self) -> bool:
        return self._closing.is_set() and self._current is None and self.inbox.empty()

    def pause(self, delay: float, why: str) -> None:
        log.warning("%s stage: %s; retrying in %.1fs", self.name, why, delay)
        time.sleep(delay)  # outcomes in hand are recorded even while stopping

    def step(self) -> None:
        if self._current is None:
            try:
                self._current = self.inbox.get(timeout=HANDOFF_POLL_S)
            except queue.Empty:
                return
        results, claimed_at = self._current
        if time.monotonic() - claimed_at > self.settings.lease_s:
            log.error(
                "could not record %d outcomes before the lease ran out; they will be "
                "resolved as UNKNOWN",
                len(results),
            )
        else:
            self._mark(self.connect(), results)
        self.held.discard(r.effect.id for r in results)
        self._current = None

    def _mark(self, conn: psycopg.Connection[Any], results: Sequence[PublishResult]) -> None:
        """One statement for the batch. A row the database refuses (a value it cannot store, a
        constraint an operator added) must not keep the others unrecorded: the batch is split
        until the refused row stands alone; it is left to its lease expiry (UNKNOWN, then
        verified) and the rest are recorded."""
        try:
            self._mark_set(conn, results)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            if len(results) == 1:
                r = results[0]
                log.error(
                    "the outcome of this attempt could not be recorded; its lease expiry will "
                    "make it UNKNOWN, to be verified",
                    extra={
                        "operation_key": r.effect.operation_key,
                        "effect_id": r.effect.id,
                        "attempt": r.effect.attempt,
                        "outcome": r.outcome.value,
                        "reason": describe(exc),
                    },
                )
                return
            half = len(results) // 2
            self._mark(conn, results[:half])
            self._mark(conn, results[half:])

    def _mark_set(self, conn: psycopg.Connection[Any], results: Sequence[PublishResult]) -> None:
        """Claimed rows (``mark_outcomes``) and batch-claimed intents, whose effect rows are
        written now (``mark_batch_outcomes``; a whole batch that needs nothing more after its
        publication: ``mark_quiet_batch``), in one transaction. A set that is one quiet batch
        (a drain's every set) is one statement, atomic on its own: no BEGIN and COMMIT round
        trips."""
        quiet = quiet_batches(self.settings, results)
        done: set[int] = set()
        if len(quiet) == 1 and len(next(iter(quiet.values()))) == len(results):
            done = self._write_quiet(conn, quiet)
        if len(done) != len(results):
            with conn.transaction():
                done = self._write_quiet(conn, quiet)
                done.update(self._write_rest(conn, results, done))
        observability.record_marked(
            written(results, [state_after(self.settings, r).value for r in results], done)
        )
        if len(done) != len(results):
            log.warning(
                "some outcomes were not recorded: the lease was lost or the replica fenced",
                extra={"expected": len(results), "recorded": len(done)},
            )
        if self._on_marked is not None:
            self._on_marked(results)

    def _write_rest(
        self, conn: psycopg.Connection[Any], results: Sequence[PublishResult], done: set[int]
    ) -> list[int]:
        """The outcomes a quiet batch did not record, decided per intent; the ids recorded."""
        marked: list[int] = []
        for batched in (False, True):
            part = [
                r
                for r in results
                if (r.effect.batch is not None) is batched and r.effect.id not in done
            ]
            if part:
                marked += self._write(
                    conn, part, [state_after(self.settings, r).value for r in part]
                )
        return marked

    def _write_quiet(
        self, conn: psycopg.Connection[Any], quiet: dict[int, list[PublishResult]]
    ) -> set[int]:
        """The whole batches that need nothing more after publication (see ``quiet_batches``),
        each recorded by one statement with no work per intent; the ids recorded. The arrays
        go as array literals: psycopg's list dumper cost about 2.5 % of the relay's CPU in a
        drain."""
        done: set[int] = set()
        for batch, members in quiet.items():
            name, params = quiet_batch_statement(self.who, batch, members)
            row = conn.execute(query(name), params).fetchone()
            if row is not None and int(row[0]) == 1:
                done.update(r.effect.id for r in members)
        return done

    def _write(
        self, conn: psycopg.Connection[Any], results: Sequence[PublishResult], states: list[str]
    ) -> list[int]:
        """One statement for results that are all batch-claimed, or all claimed rows."""
        params: dict[str, Any] = {
            "owner": self.who.replica_id,
            "epoch": self.who.epoch,
            "ids": [r.effect.id for r in results],
            "states": states,
            "outcomes": [r.outcome.value for r in results],
            "reasons": [reason_of(self.settings, r) for r in results],
            "partitions": [r.partition for r in results],
            "offsets": [r.offset for r in results],
            "delays_s": [not_sent_delay(self.settings, r) for r in results],
        }
        if results[0].effect.batch is None:
            params["attempts"] = [r.effect.attempt for r in results]
            name = "mark_outcomes"
        else:
            params["batches"] = [r.effect.batch for r in results]
            params["actor"] = self.who.replica_id
            name = "mark_batch_outcomes"
        return [int(row[0]) for row in conn.execute(query(name), params).fetchall()]


def quiet_batch_statement(
    who: Identity, batch: int, members: Sequence[PublishResult]
) -> tuple[str, dict[str, Any]]:
    """The statement that records one quiet batch, and its parameters: the arrays in id order;
    a batch of one type (a drain's every batch) goes in as its arrays came
    (``mark_quiet_batch_of_one_type``), one of several types is split by type
    (``mark_quiet_batch``)."""
    ordered = sorted(members, key=lambda r: r.effect.id)
    types = {r.effect.effect_type for r in ordered}
    params: dict[str, Any] = {
        "owner": who.replica_id,
        "epoch": who.epoch,
        "batch": batch,
        "ids": int_array([r.effect.id for r in ordered]),
        "partitions": int_array([r.partition for r in ordered]),
        "offsets": int_array([r.offset for r in ordered]),
    }
    if len(types) == 1:
        params["effect_type"] = types.pop()
        return "mark_quiet_batch_of_one_type", params
    params["types"] = text_array([r.effect.effect_type for r in ordered])
    return "mark_quiet_batch", params


def quiet_batches(
    settings: Settings, results: Sequence[PublishResult]
) -> dict[int, list[PublishResult]]:
    """The batches of ``results`` whose every intent is acknowledged and of a type that awaits
    no result, with status events off or every intent's in the batch's Kafka transaction: nothing
    per intent is left to record (issue 19). A batch is taken whole or not at all; the database
    checks again that these are all of its intents."""
    batches: dict[int, list[PublishResult]] = {}
    spoilt: set[int] = set()
    for r in results:
        batch = r.effect.batch
        if batch is None:
            continue
        spec = settings.effect_type(r.effect.effect_type)
        if (
            r.outcome is not AttemptOutcome.ACKED
            or r.offset is None
            or r.partition is None
            or spec is None
            or spec.result_topic is not None
            or (settings.status_events and not r.effect.status_in_txn)
        ):
            spoilt.add(batch)
        batches.setdefault(batch, []).append(r)
    return {b: members for b, members in batches.items() if b not in spoilt}


def int_array(values: Sequence[int | None]) -> str:
    """PostgreSQL's text form of an integer array."""
    if None in values:
        return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"
    return "{" + ",".join(map(str, values)) + "}"


def text_array(values: Sequence[str]) -> str:
    """PostgreSQL's text form of a text array, every element quoted (each distinct one once)."""
    quoted = {v: '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in set(values)}
    return "{" + ",".join(map(quoted.__getitem__, values)) + "}"


def written(
    results: Sequence[PublishResult], states: Sequence[str], marked_ids: Iterable[int]
) -> Counter[str]:
    """The states the marking really wrote, by count (compare-and-set may skip some rows)."""
    done = set(marked_ids)
    return Counter(
        state for result, state in zip(results, states, strict=True) if result.effect.id in done
    )


def gave_up(settings: Settings, result: PublishResult) -> bool:
    """Attempts that provably published nothing are retried, but not forever."""
    retriable = STATE_AFTER[result.outcome] is EffectState.PENDING
    return retriable and result.suspect and result.effect.attempt >= settings.max_publish_attempts


def state_after(settings: Settings, result: PublishResult) -> EffectState:
    """The effect's state once this attempt's outcome is recorded."""
    return EffectState.REJECTED if gave_up(settings, result) else STATE_AFTER[result.outcome]


def reason_of(settings: Settings, result: PublishResult) -> str | None:
    """The reason recorded with the outcome (a broker's words can hold what text cannot)."""
    reason = result.reason
    if gave_up(settings, result):
        reason = (
            f"gave up after {result.effect.attempt} attempts that published nothing; last: {reason}"
        )
    return None if reason is None else reason.replace("\x00", "\ufffd")


def not_sent_delay(
    settings: Settings,
    result: PublishResult,
    jitter: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds before a provably unsent effect may go again (0: at once)."""
    if STATE_AFTER[result.outcome] is not EffectState.PENDING or not result.suspect:
        # An innocent record of an aborted transaction goes again at once; the suspects wait
        # (with jitter), so the next batch is not poisoned by the same record.
        return 0.0
    exponent = min(result.effect.attempt - 1, 20)
    cap = settings.not_sent_backoff_max_s
    return float(min(cap, settings.not_sent_backoff_s * 2**exponent)) * jitter(0.5, 1.5)
