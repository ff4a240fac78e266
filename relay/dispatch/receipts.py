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


Line = tuple[int, int, str, int, int]  # effect id, attempt, topic, partition, offset


def receipt_values(
    spec: ReceiptSpec,
    txn: str,
    batches: Sequence[int],
    lines: Sequence[Line],
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
    lines: Sequence[Line],
) -> bytes:
    """Records as runs: a run is records of one partition at consecutive offsets (a batch's
    records mostly are), written as its topic, partition, first offset, first effect id, the
    differences between consecutive ids (small numbers), and the attempts (1: all first
    attempts). A batch of 5,000 takes about 15 kB, where a column per field took 115 kB."""
    topics = sorted({line[2] for line in lines})
    index = {topic: n for n, topic in enumerate(topics)}
    runs: list[list[Any]] = []
    last_key: tuple[str, int] | None = None
    last_offset = last_id = 0
    deltas: list[int] = []
    attempts: list[int] = []
    for effect_id, attempt, topic, partition, offset in sorted(lines, key=_placement):
        if (topic, partition) == last_key and offset == last_offset + 1:
            deltas.append(effect_id - last_id)
            attempts.append(attempt)
        else:
            deltas, attempts = [], [attempt]
            runs.append([index[topic], partition, offset, effect_id, deltas, attempts])
            last_key = (topic, partition)
        last_offset, last_id = offset, effect_id
    for run in runs:
        if all(a == 1 for a in run[5]):
            run[5] = 1
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
        "runs": runs,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _placement(line: Line) -> tuple[str, int, int]:
    return line[2], line[3], line[4]


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
        lines: list[ReceiptLine] = []
        if not isinstance(body["runs"], list):
            return None
        for run in body["runs"]:
            if not isinstance(run, list) or len(run) != 6:
                return None
            topic = topics[_int(run[0], len(topics) - 1)]
            partition = _int(run[1], _INT4)
            offset, effect_id = _int(run[2], _INT8), _int(run[3], _INT8)
            deltas = _ints(run[4])
            attempts = [1] * (len(deltas) + 1) if type(run[5]) is int and run[5] == 1 else None
            attempts = attempts or [_int(a, _INT4) for a in _list(run[5])]
            if len(attempts) != len(deltas) + 1 or offset + len(deltas) > _INT8:
                return None
            lines.append(ReceiptLine(effect_id, attempts[0], topic, partition, offset))
            for n, delta in enumerate(deltas, start=1):
                effect_id = _int(effect_id + delta)
                lines.append(ReceiptLine(effect_id, attempts[n], topic, partition, offset + n))
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
            batches=tuple(_int(b) for b in _list(body["batches"])),
            lines=tuple(lines),
        )
    except Exception:  # noqa: BLE001 - whatever the value holds (RecursionError too): not one
        return None


_INT4 = 2**31 - 1  # what the database's integer columns hold
_INT8 = 2**63 - 1


def _int(value: Any, most: int = _INT8) -> int:
    """A whole number from 0 to ``most`` (booleans and floats are not)."""
    if type(value) is not int or not 0 <= value <= most:
        raise ValueError(f"not an integer from 0 to {most}: {value!r}")
    return value


def _list(values: Any) -> list[Any]:
    if not isinstance(values, list):
        raise TypeError("not a list")
    return values


def _ints(values: Any) -> list[int]:
    """Differences between consecutive ids: any sign, within bigint."""
    out = _list(values)
    for v in out:
        if type(v) is not int or not -_INT8 <= v <= _INT8:
            raise ValueError(f"not an integer: {v!r}")
    return out


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"not a string: {value!r}")
    return value


def _strs(values: Any) -> list[str]:
    if not isinstance(values, list):
        raise TypeError("not a list")
    return [_str(v) for v in values]
