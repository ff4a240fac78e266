"""Records handed to kafka-python's record accumulator a batch at a time.

``KafkaProducer.send`` makes, for every record, checks that hold for a whole batch once they hold
for its first record: the header types, the topic's metadata, the record's size, the
transaction's state and whether the partition is in the transaction yet (a lock taken twice).
In a drain they were half of ``send``'s cost and a third of the publishing thread's (py-spy, a
batch of 5,000). The relay has made them already: its records are bytes with (str, bytes)
headers, each topic's metadata is asked once a batch, a record over ``max_request_size`` is
refused before it is sent (its estimate bounds kafka-python's from above), and the
transaction's state is checked with the first record of each partition; an error after that
fails the records' futures, as an error in flight does.

The accumulator is kafka-python's internal API (tested with kafka-python 3.0); a producer
without it, or a record without a partition (the partitioner's to pick), goes through ``send``.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaProducer
from kafka.structs import TopicPartition


class Appender:
    """One batch's records into one producer's buffers, in the order given."""

    __slots__ = ("_accumulator", "_added", "_producer", "_sender", "_transactions")

    def __init__(self, producer: KafkaProducer) -> None:
        self._producer = producer
        accumulator = getattr(producer, "_accumulator", None)
        sender = getattr(producer, "_sender", None)
        transactions = getattr(producer, "_transaction_manager", None)
        direct = callable(getattr(accumulator, "append", None)) and callable(
            getattr(sender, "wakeup", None)
        )
        if transactions is not None and not (
            callable(getattr(transactions, "is_transactional", None))
            and callable(getattr(transactions, "maybe_add_partition_to_transaction", None))
        ):
            direct = False
        self._accumulator: Any = accumulator if direct else None
        self._sender: Any = sender
        self._transactions: Any = (
            transactions if transactions is not None and transactions.is_transactional() else None
        )
        self._added: set[TopicPartition] = set()

    @property
    def direct(self) -> bool:
        """Whether records bypass ``send`` (False: kafka-python lacks the internals)."""
        return self._accumulator is not None

    def append(
        self,
        topic: str,
        partition: int | None,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> Any:
        """The record's future, as ``send`` returns it; raises what ``send`` would raise for the
        first record of a partition (a transaction in error, a producer closed)."""
        if self._accumulator is None or partition is None:
            return self._producer.send(
                topic, key=key, value=value, headers=headers, partition=partition
            )
        tp = TopicPartition(topic, partition)
        if tp not in self._added:
            if self._transactions is not None:
                self._transactions.maybe_add_partition_to_transaction(tp)
            self._added.add(tp)
        future, batch_is_full, new_batch, _ = self._accumulator.append(
            tp, None, key, value, headers
        )
        if batch_is_full or new_batch:
            self._sender.wakeup()
        return future
