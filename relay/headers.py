"""Kafka headers of a dispatch message: CloudEvents 1.0 binary binding plus the relay's own."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

CE_SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"
H_EFFECT_ID = "relay_effect_id"
H_ATTEMPT = "relay_attempt"
H_BUSINESS_KEY = "relay_business_key"
H_TRACEPARENT = "traceparent"
H_TRANSITION_ID = "relay_transition_id"
H_BATCH_ID = "relay_batch_id"
H_ORDERING_GROUP = "relay_ordering_group"
STATUS_EVENT_TYPE = "relay.status"


_SPECVERSION = CE_SPECVERSION.encode()
_CONTENT_TYPE = CONTENT_TYPE.encode()


# The date and time to the second in UTC, by the moment's wall-clock second in its zone: the
# effects of a batch were mostly enqueued within a few seconds of each other (formatting each
# time whole took 6 % of a drain's relay CPU).
_SECONDS: dict[tuple[object, ...], str] = {}
_SECONDS_KEPT = 1024


def _isoformat_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def rfc3339_uncached(moment: datetime) -> str:
    """For a time of one effect only (its enqueue): what ``isoformat`` writes for the moment in
    UTC, ``Z`` for the offset. The part to the second comes from a small cache keyed by the
    zone and the wall-clock second (fold included: the zone's offset is a function of them), so
    it costs a lookup, not a conversion and a format, per effect."""
    tz = moment.tzinfo
    if tz is None or type(moment) is not datetime:
        # A naive time is local time, as astimezone reads it; a subclass may format otherwise.
        return _isoformat_utc(moment)
    key = (
        tz,
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.fold,
    )
    try:
        prefix = _SECONDS.get(key)
    except TypeError:  # a zone that cannot be hashed (dateutil's)
        return _isoformat_utc(moment)
    if prefix is None:
        offset = moment.utcoffset()
        if offset is None or offset.microseconds:
            return _isoformat_utc(moment)  # a zone without an offset, or one of a fraction
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        prefix = _SECONDS[key] = _isoformat_utc(moment.replace(microsecond=0))[:-1]
    micro = moment.microsecond
    return f"{prefix}.{micro:06d}Z" if micro else f"{prefix}Z"


@lru_cache(maxsize=4096)
def rfc3339(moment: datetime) -> str:
    """Cached: a batch's status events share their claim and publication times."""
    return rfc3339_uncached(moment)


def dispatch_headers(
    *,
    effect_id: int,
    effect_type: str,
    attempt: int,
    created_at: datetime,
    source: str,
    business_key: str | None,
    traceparent: str | None,
    ordering_group: str | None = None,
) -> list[tuple[str, bytes]]:
    """``ce_id`` is the effect id: stable across attempts, so consumers can deduplicate on it."""
    effect = str(effect_id).encode()
    headers = [
        ("ce_specversion", _SPECVERSION),
        ("ce_id", effect),
        ("ce_type", effect_type.encode()),
        ("ce_source", source.encode()),
        ("ce_time", rfc3339_uncached(created_at).encode()),
        ("content-type", _CONTENT_TYPE),
        (H_EFFECT_ID, effect),
        (H_ATTEMPT, str(attempt).encode()),
    ]
    if business_key is not None:
        headers.append((H_BUSINESS_KEY, business_key.encode()))
    if traceparent is not None:
        headers.append((H_TRACEPARENT, traceparent.encode()))
    if ordering_group is not None:
        headers.append((H_ORDERING_GROUP, ordering_group.encode()))
    return headers


def status_headers(
    *,
    effect_id: int,
    transition_id: int | None,
    at: datetime,
    source: str,
    traceparent: str | None,
    part: int = 2,
    batch_id: int | None = None,
) -> list[tuple[str, bytes]]:
    """``ce_id`` is ``<effect id>.<transition id>``, and ``.<part>`` for a transition implied by
    that row (0: the enqueue, 1: the claim): unique per event, stable if it is re-sent. An event
    that rode in its batch's Kafka transaction has no transition row: ``<effect id>.b<batch
    id>.<part>`` (2: the publication), sent once (an aborted batch's story is the log's)."""
    if transition_id is not None:
        ce_id = f"{effect_id}.{transition_id}" + ("" if part == 2 else f".{part}")
        own = (H_TRANSITION_ID, str(transition_id).encode())
    else:
        ce_id = f"{effect_id}.b{batch_id}.{part}"
        own = (H_BATCH_ID, str(batch_id).encode())
    headers = [
        ("ce_specversion", _SPECVERSION),
        ("ce_id", ce_id.encode()),
        ("ce_type", STATUS_EVENT_TYPE.encode()),
        ("ce_source", source.encode()),
        ("ce_time", rfc3339(at).encode()),
        ("content-type", _CONTENT_TYPE),
        (H_EFFECT_ID, str(effect_id).encode()),
        own,
    ]
    if traceparent is not None:
        headers.append((H_TRACEPARENT, traceparent.encode()))
    return headers
