"""Records handed to kafka-python's record accumulator a batch at a time.

``KafkaProducer.send`` makes, for every record, checks that hold for a whole batch once they hold
for its first record: the header types, the topic's metadata, the record's size, the
transaction's state and whether the partition is in the transaction yet (a lock taken twice).
In a drain they were half of ``send``'s cost and a third of the publishing thread's (py-spy, a
batch of 5,000). For the relay's records most hold by construction: keys, values and header
values are bytes and header names str (``relay.headers``), each topic's partitions come from
its metadata, asked once a batch. The relay refuses a record over its limit before it is added
(its estimate bounds kafka-python's from above). The transaction's state is checked here before
each run of a partition's records: a transaction in error refuses the rest of the batch's
records as ``send`` would (not sent), and an error between two checks fails the records of the
run in flight through their futures, as an error after ``send`` does.

The accumulator's own ``append`` then takes the partition's lock and two more for a counter, for
every record: the records of a partition are appended in runs under one hold of its lock, into
its open producer batch, as ``append`` does one at a time (a new producer batch is made by
``append`` itself). A run is short (``RUN`` records) so that the sender thread, which drains a
partition under the same lock, never waits long.

The accumulator is kafka-python's internal API: it is used with kafka-python 3.0.x only (the
version it is tested with; its shape is checked too). Any other version, a producer without it,
or a record without a partition (the partitioner's to pick), goes through ``send``.
"""

from __future__ import annotations

from typing import Any

import kafka
from kafka import KafkaProducer
from kafka import errors as kerr
from kafka.structs import TopicPartition

RUN = 64

# A queued record: key, value, headers, its slot.
_Queued = tuple[bytes, bytes, list[tuple[str, bytes]], int]

_ACCUMULATOR_PARTS = ("append", "_tp_lock", "_batches", "_appends_in_progress")


def _direct(producer: KafkaProducer) -> bool:
    if not str(getattr(kafka, "__version__", "")).startswith("3.0."):
        return False
    accumulator = getattr(producer, "_accumulator", None)
    sender = getattr(producer, "_sender", None)
    transactions = getattr(producer, "_transaction_manager", None)
    return (
        all(hasattr(accumulator, part) for part in _ACCUMULATOR_PARTS)
        and hasattr(accumulator, "_closed")
        and callable(getattr(sender, "wakeup", None))
        and (
            transactions is None
            or (
                callable(getattr(transactions, "is_transactional", None))
                and callable(getattr(transactions, "maybe_add_partition_to_transaction", None))
                and callable(getattr(transactions, "_fail_if_not_ready_for_send", None))
            )
        )
    )


class Appender:
    """One batch's records into one producer's buffers. ``add`` queues a record and returns its
    slot; ``flush`` appends them all (each partition's in the order added) and returns, by slot,
    each record's future or the exception that refused it."""

    __slots__ = ("_accumulator", "_producer", "_queued", "_sender", "_slots", "_transactions")

    def __init__(self, producer: KafkaProducer) -> None:
        self._producer = producer
        direct = _direct(producer)
        self._accumulator: Any = getattr(producer, "_accumulator", None) if direct else None
        self._sender: Any = getattr(producer, "_sender", None)
        transactions: Any = getattr(producer, "_transaction_manager", None)
        self._transactions: Any = (
            transactions
            if direct and transactions is not None and transactions.is_transactional()
            else None
        )
        self._queued: dict[TopicPartition, list[_Queued]] = {}
        self._slots: list[Any] = []

    @property
    def direct(self) -> bool:
        """Whether records bypass ``send`` (False: kafka-python lacks the internals)."""
        return self._accumulator is not None

    def add(
        self,
        topic: str,
        partition: int | None,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> int:
        """Queue a record (a record through ``send`` goes at once); its slot in ``flush``."""
        slot = len(self._slots)
        if self._accumulator is None or partition is None:
            try:
                sent: Any = self._producer.send(
                    topic, key=key, value=value, headers=headers, partition=partition
                )
            except Exception as exc:  # noqa: BLE001 - handed back in its slot, as a refusal
                sent = exc
            self._slots.append(sent)
            return slot
        self._slots.append(None)
        tp = TopicPartition(topic, partition)
        queued = self._queued.get(tp)
        if queued is None:
            queued = self._queued[tp] = []
        queued.append((key, value, headers, slot))
        return slot

    def flush(self) -> list[Any]:
        """Append every queued record; by slot, its future or the exception that refused it
        (``send``'s for the first record of a partition: a transaction in error, a producer
        closed)."""
        queued, self._queued = self._queued, {}
        if queued and getattr(self._producer, "_closed", False):
            closed = kerr.IllegalStateError("KafkaProducer already closed!")
            for records in queued.values():
                for *_, slot in records:
                    self._slots[slot] = closed
            return self._slots
        for tp, records in queued.items():
            try:
                if self._transactions is not None:
                    self._transactions.maybe_add_partition_to_transaction(tp)
                self._append_runs(tp, records)
            except Exception as exc:  # noqa: BLE001 - the partition's unappended records share it
                for *_, slot in records:
                    if self._slots[slot] is None:
                        self._slots[slot] = exc
        return self._slots

    def _append_runs(self, tp: TopicPartition, records: list[_Queued]) -> None:
        accumulator, slots = self._accumulator, self._slots
        lock = accumulator._tp_lock(tp)
        done, count = 0, len(records)
        while done < count:
            start = done
            full = False
            if self._transactions is not None:
                # send()'s check of the transaction, once a run: raises, and the partition's
                # records not yet appended are refused with it (flush).
                self._transactions._fail_if_not_ready_for_send()
            if not accumulator._closed:
                # As RecordAccumulator.append: the count of appends in progress, then the lock.
                accumulator._appends_in_progress.increment()
                try:
                    with lock:
                        queue = accumulator._batches[tp]
                        if queue:
                            last = queue[-1]
                            stop = min(count, start + RUN)
                            while done < stop:
                                key, value, headers, slot = records[done]
                                future = last.try_append(None, key, value, headers)
                                if future is None:
                                    break
                                slots[slot] = future
                                done += 1
                            full = len(queue) > 1 or last.records.is_full()
                finally:
                    accumulator._appends_in_progress.decrement()
            if done == start:
                # No open producer batch with room (or a closed accumulator, which raises):
                # the accumulator makes one.
                key, value, headers, slot = records[done]
                future, full, new_batch, _ = accumulator.append(tp, None, key, value, headers)
                slots[slot] = future
                done += 1
                full = full or new_batch
            if full:
                self._sender.wakeup()
