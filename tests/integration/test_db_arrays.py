"""The relay's connections send lists as binary arrays (``relay.db.connect``): every awkward
value a statement's array parameters can carry must arrive as it was sent."""

from __future__ import annotations

from relay import db
from relay.config import Settings


def test_awkward_values_in_array_parameters_arrive_unchanged(settings: Settings) -> None:
    texts = ["a,b", '"quoted"', "back\\slash", "{braces}", "NULL", "", "é ☃ 𝄞", None]
    raws = [b"\x00\x01\xff", b"", b'{"json": "value"}', None]
    ints = [0, -1, 2**31, 2**62, None]
    with db.connect(settings, purpose="test-arrays") as conn:
        row = conn.execute(
            "SELECT %(texts)s::text[], %(raws)s::bytea[], %(ints)s::bigint[], %(small)s::int[], "
            "%(empty)s::bigint[], cardinality(%(texts)s::text[]), "
            "(SELECT count(*) FROM unnest(%(texts)s::text[]) t WHERE t IS NULL)",
            {"texts": texts, "raws": raws, "ints": ints, "small": [1, 2], "empty": []},
        ).fetchone()
    assert row is not None
    assert row[0] == texts
    assert row[1] == raws
    assert row[2] == ints
    assert row[3] == [1, 2]
    assert row[4] == []
    assert row[5] == len(texts)
    assert row[6] == 1  # None is SQL NULL, not the text "NULL"
