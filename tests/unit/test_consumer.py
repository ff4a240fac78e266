"""The result consumer's pure part: a record's value parsed into a result, or why it is malformed.

(Reading, storing evidence, offsets and the per-record fallback need the broker and the
database: tests/integration/test_reconciler_results.py, test_observability_reconciler.py,
test_reconciler_faults.py; any bytes at all: test_result_parser_properties.py.)
"""

from __future__ import annotations

from relay.messages import ResultOutcome
from relay.reconciler.consumer import parse


def test_results_parse_or_say_why_not() -> None:
    ok = parse(b'{"operation_key": "k", "outcome": "committed", "external_id": "x"}')
    assert not isinstance(ok, str) and ok.outcome is ResultOutcome.COMMITTED
    assert parse(None) == "empty record (a tombstone)"
    for junk in (b"\xff\xfe", b"{", b"[]", b'{"operation_key": "k", "outcome": "maybe"}'):
        assert isinstance(parse(junk), str), junk
    extra = parse(b'{"operation_key": "k", "outcome": "rejected", "surprise": 1}')
    assert isinstance(extra, str) and "surprise" in extra
