"""The value of a status event, whichever way it travels: from the transitions log (the status
publisher) or in its batch's Kafka transaction, next to the record it reports on (the publisher).
One shape, so that a consumer cannot tell the two apart except by ``ce_id``."""

from __future__ import annotations

import json
import time
from datetime import datetime

# The story an intent published in its batch's transaction tells (the log's implied parts).
ENQUEUED = "enqueued"
CLAIMED = "claimed for publication"
PUBLISHED_IN_TXN = "published: in the Kafka transaction of its record"

# One encoder: json.dumps with any option builds a new one at every call (three per intent).
_JSON = json.JSONEncoder(separators=(",", ":"))


def status_value(
    *,
    operation_key: str,
    effect_type: str,
    state: str,
    previous_state: str | None,
    reason: str,
    attempt: int,
    at: datetime,
    traceparent: str | None,
) -> bytes:
    return _JSON.encode(
        {
            "operation_key": operation_key,
            "effect_type": effect_type,
            "state": state,
            "previous_state": previous_state,
            "reason": reason,
            "attempt": attempt,
            "at": at.isoformat(),
            "traceparent": traceparent,
        }
    ).encode()


class StatusRoute:
    """Whether status events may ride in the records' transactions now. A status topic found
    unavailable (missing, with auto-creation off) pauses that for a while: the intents claimed
    meanwhile have their events published from the log, and nothing waits on the topic's
    metadata at every batch. Read by the claimer (it records the choice with the claim), set by
    the publisher."""

    def __init__(self, pause_s: float = 60.0) -> None:
        self.pause_s = pause_s
        self._until = 0.0

    def in_txn(self) -> bool:
        return time.monotonic() >= self._until

    def pause(self) -> None:
        self._until = time.monotonic() + self.pause_s
