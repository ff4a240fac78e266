"""Receipts: one more record in each Kafka transaction, naming what the transaction committed.

A receipt is written by the producer that writes the records, inside their transaction, once
every record is acknowledged: it is visible to a read_committed reader if and only if they are.
It names the transaction's batches (``relay.dispatch_batch``) and, for each record, its effect,
attempt, topic, partition and offset. It is keyed by the replica's transactional id, so that after
fencing that id one read of the receipts topic says which of its batches committed and where
their records lie (``settler.py``), where the per-record search (``lookup.py``) reads every
dispatch topic for each effect. This is how Kafka Connect's exactly-once sources keep their
offsets (KIP-618): in the transaction that carries the records. Pure: building and parsing only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

RECEIPT_VERSION = 1
RECEIPT_CHUNK = 2000  # records a receipt lists at most: a few tens of kB, far below any limit


def receipt_bound_s(lease_s: float, publish_timeout_s: float) -> float:
    """The latest a receipt is sent after its batch's claim: a batch is published within half
    its lease of the claim or given back, and its records are waited for at most
    publish_timeout_s, twice (records, then status events). A publisher past it aborts rather
    than send the receipt, so that a settler reading up to it cannot miss one."""
    return lease_s / 2 + 2 * publish_timeout_s


class ReceiptSpec(NamedTuple):
    """What a publisher needs to write the receipt of a transaction, and who it is."""

    topic: str
    key: bytes  # the replica's transactional id
    install: str  # the installation (database) the batches belong to
    replica: str
    epoch: int


class ReceiptLine(NamedTuple):
    """One record of a transaction, as its receipt lists it."""

    effect_id: int
    attempt: int
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Receipt:
    """One part of a transaction's receipt (a large transaction's receipt has several)."""

    install: str
    replica: str
    epoch: int
    txn: str  # the transaction's own id: its parts share it
    part: int
    parts: int
    batches: tuple[int, ...]
    lines: tuple[ReceiptLine, ...]


def receipt_values(
    spec: ReceiptSpec,
    txn: str,
    batches: Sequence[int],
    lines: Sequence[ReceiptLine],
    limit_bytes: int,
) -> list[bytes]:
    """The receipt of one transaction, in as many parts as it takes for each to stay within
    half of ``limit_bytes`` (the record size the relay allows itself)."""
    chunk = RECEIPT_CHUNK
    while True:
        pieces = [lines[i : i + chunk] for i in range(0, len(lines), chunk)] or [[]]
        values = [
            _encode(spec, txn, batches, n, len(pieces), piece) for n, piece in enumerate(pieces)
        ]
        if chunk == 1 or max(map(len, values)) <= limit_bytes // 2:
            return values
        chunk = max(1, chunk // 2)


def _encode(
    spec: ReceiptSpec,
    txn: str,
    batches: Sequence[int],
    part: int,
    parts: int,
    lines: Sequence[ReceiptLine],
) -> bytes:
    topics = sorted({line.topic for line in lines})
    index = {topic: n for n, topic in enumerate(topics)}
    body = {
        "v": RECEIPT_VERSION,
        "install": spec.install,
        "replica": spec.replica,
        "epoch": spec.epoch,
        "txn": txn,
        "part": part,
        "parts": parts,
        "batches": sorted(batches),
        "topics": topics,
        # Columns, one element per record: a quarter of the size of an object per record.
        "ids": [line.effect_id for line in lines],
        "attempts": [line.attempt for line in lines],
        "topic": [index[line.topic] for line in lines],
        "partitions": [line.partition for line in lines],
        "offsets": [line.offset for line in lines],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def parse_receipt(value: bytes | None) -> Receipt | None:
    """A receipt, or None for anything that is not one of this version (it is skipped: a
    reader never trusts a record it cannot read completely)."""
    if value is None:
        return None
    try:
        body = json.loads(value)
        if not isinstance(body, dict) or body.get("v") != RECEIPT_VERSION:
            return None
        topics = _strs(body["topics"])
        columns = [_ints(body[name]) for name in ("ids", "attempts", "topic", "partitions")]
        offsets = _ints(body["offsets"])
        if any(len(column) != len(offsets) for column in columns):
            return None
        ids, attempts, topic_of, partitions = columns
        lines = tuple(
            ReceiptLine(i, a, topics[t], p, o)
            for i, a, t, p, o in zip(ids, attempts, topic_of, partitions, offsets, strict=True)
        )
        part, parts = _int(body["part"]), _int(body["parts"])
        if not 0 <= part < parts:
            return None
        return Receipt(
            install=_str(body["install"]),
            replica=_str(body["replica"]),
            epoch=_int(body["epoch"]),
            txn=_str(body["txn"]),
            part=part,
            parts=parts,
            batches=tuple(_ints(body["batches"])),
            lines=lines,
        )
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"not an integer: {value!r}")
    return value


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list):
        raise TypeError("not a list")
    return [_int(v) for v in values]


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"not a string: {value!r}")
    return value


def _strs(values: Any) -> list[str]:
    if not isinstance(values, list):
        raise TypeError("not a list")
    return [_str(v) for v in values]
