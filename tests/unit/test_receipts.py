"""The receipt a transaction carries: built, split, parsed; and when one can have been written."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from relay.config import Settings
from relay.dispatch.receipts import (
    RECEIPT_CHUNK,
    ReceiptLine,
    ReceiptSpec,
    parse_receipt,
    receipt_bound_s,
    receipt_values,
)
from relay.dispatch.settler import receipt_windows

SPEC = ReceiptSpec("relay.receipts", b"relay-r1", "abc123", "r1", 4)


def _lines(n: int) -> list[ReceiptLine]:
    """Records as a drain makes them: ids in order, spread over partitions by key, offsets
    consecutive within a partition, with a gap (another producer's records) and retries."""
    lines = []
    offsets = {0: 100, 1: 5_000, 2: 77}
    for i in range(n):
        partition = (i * 7) % 3
        offsets[partition] += 1 if i != n // 2 else 40
        attempt = 1 if i % 50 else 2
        lines.append(
            ReceiptLine(1_000_000 + i, attempt, ("a", "b")[i % 2], partition, offsets[partition])
        )
    return lines


def _placed(lines: list[ReceiptLine]) -> list[ReceiptLine]:
    return sorted(lines, key=lambda x: (x.topic, x.partition, x.offset))


def test_a_receipt_reads_back_as_written() -> None:
    lines = _lines(101)
    (value,) = receipt_values(SPEC, "txn-1", [12, 11], lines, 1_000_000)
    receipt = parse_receipt(value)
    assert receipt is not None
    assert (receipt.install, receipt.replica, receipt.epoch, receipt.txn) == (
        "abc123",
        "r1",
        4,
        "txn-1",
    )
    assert (receipt.part, receipt.parts, receipt.batches) == (0, 1, (11, 12))
    assert list(receipt.lines) == _placed(lines)


def test_a_large_transaction_has_a_receipt_in_parts_each_within_half_the_limit() -> None:
    lines = _lines(5 * RECEIPT_CHUNK + 3)
    limit = 20_000
    values = receipt_values(SPEC, "txn-2", [1], lines, limit)
    assert len(values) > 5 and all(len(v) <= limit // 2 for v in values)
    parsed = [parse_receipt(v) for v in values]
    assert all(p is not None for p in parsed)
    assert [p.part for p in parsed if p] == list(range(len(values)))
    assert {p.parts for p in parsed if p} == {len(values)}
    assert sorted(line for p in parsed if p for line in p.lines) == sorted(lines)
    # Every part names the transaction's batches: any one of them says it committed.
    assert {p.batches for p in parsed if p} == {(1,)}


def test_a_drains_batch_of_5000_takes_a_few_kilobytes() -> None:
    """Runs of consecutive offsets and differences between ids: about 3 bytes a record."""
    lines = [ReceiptLine(900_000 + i, 1, "t", i % 3, 10_000 + i // 3) for i in range(5000)]
    values = receipt_values(SPEC, "txn-5", [7], lines, 1_000_000)
    assert sum(map(len, values)) < 20_000, [len(v) for v in values]
    assert sorted(line for v in values if (p := parse_receipt(v)) for line in p.lines) == lines


def test_a_transaction_without_records_still_has_one_part() -> None:
    (value,) = receipt_values(SPEC, "txn-3", [], [], 1_000_000)
    receipt = parse_receipt(value)
    assert receipt is not None and receipt.lines == () and receipt.parts == 1


def test_what_is_not_a_receipt_of_this_version_is_none() -> None:
    (value,) = receipt_values(SPEC, "txn-4", [1], _lines(60), 1_000_000)
    body = json.loads(value)
    run = body["runs"][0]
    assert parse_receipt(None) is None
    assert parse_receipt(b"not json") is None
    assert parse_receipt(b"[1, 2]") is None
    assert parse_receipt(json.dumps({**body, "v": 2}).encode()) is None
    assert parse_receipt(json.dumps({**body, "runs": {}}).encode()) is None
    assert parse_receipt(json.dumps({**body, "runs": [run[:5]]}).encode()) is None
    assert parse_receipt(json.dumps({**body, "runs": [[9, *run[1:]]]}).encode()) is None
    assert (
        parse_receipt(json.dumps({**body, "runs": [[*run[:3], True, *run[4:]]]}).encode()) is None
    )
    assert (
        parse_receipt(json.dumps({**body, "runs": [[*run[:5], [1, 1, 1, 1, 1, 1, 1]]]}).encode())
        is None
    )
    assert parse_receipt(json.dumps({**body, "part": 1}).encode()) is None  # part of 1
    # Values the database could not hold, or that only look like numbers.
    for bad in ([-1, *run[1:]], [run[0], 2**40, *run[2:]], [*run[:5], True], [*run[:5], 1.0]):
        assert parse_receipt(json.dumps({**body, "runs": [bad]}).encode()) is None, bad
    assert parse_receipt(json.dumps({**body, "batches": [-3]}).encode()) is None
    assert parse_receipt(b"[" * 100_000) is None  # too deep for the parser: not an exception
    del body["install"]
    assert parse_receipt(json.dumps(body).encode()) is None


def test_a_receipt_is_looked_for_from_the_claim_to_the_latest_its_transaction_could_send_it() -> (
    None
):
    settings = Settings(
        lease_s=60.0, publish_timeout_s=10.0, transaction_timeout_s=30.0, clock_skew_s=5.0
    )
    at = datetime(2026, 12, 6, tzinfo=UTC)
    ms = int(at.timestamp() * 1000)
    batches = [(at, 1), (at + timedelta(seconds=20), 2), (at + timedelta(hours=1), 3)]
    windows = receipt_windows(settings, batches, 40.0)
    # 30 s (half the lease) + 2 x 10 s after the claim (wider than the writer's 40 s), and the
    # skew on both sides.
    assert receipt_bound_s(60.0, 10.0) == 50.0
    first_end = ms + 20_000 - 5_000 + 50_000 + 10_000
    assert windows[0] == (ms - 5_000, first_end, [1, 2])
    assert windows[1][2] == [3]
    assert len(windows) == 2
    # A writer whose bound was wider (other settings) is read as far as it could send.
    wider = receipt_windows(settings, batches[:1], 90.0)
    assert wider == [(ms - 5_000, ms - 5_000 + 90_000 + 10_000, [1])]
