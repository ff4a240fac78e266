"""What the system will do next with an effect by itself, and when: said from the effect's
columns and the settings, the way the relay (``relay.dispatch.daemon``: checks of its own
ambiguous publishes in Kafka) and the reconciler (``relay.reconciler.observation``) decide.

The console reads its own settings: they are the daemons' only when all read one config file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from relay.config import Settings


@dataclass
class Outlook:
    """Sentences for the story page: what was checked, what happens next, when STUCK."""

    checked: list[str] = field(default_factory=list)
    next: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)


def when(at: datetime | None, now: datetime) -> str:
    """``2026-01-02 10:00:05 UTC (in 4m 5s)``, or ``(3s ago)``."""
    if at is None:
        return "-"
    delta = (at - now).total_seconds()
    rel = f"in {duration(delta)}" if delta >= 0 else f"{duration(-delta)} ago"
    return f"{at:%Y-%m-%d %H:%M:%S %Z} ({rel})"


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else ""]
    parts += [f"{minutes}m" if minutes else "", f"{secs}s" if secs or not seconds else ""]
    return " ".join(p for p in parts if p)


def observe_delay(settings: Settings, tries: int) -> float:
    """The wait after the ``tries``-th inconclusive observation (as ``Observations._decide``)."""
    return float(min(settings.observe_backoff_max_s, settings.observe_backoff_s * 2 ** (tries - 1)))


def verify_delay(settings: Settings, tries: int) -> float:
    """The wait after a check in Kafka failed with ``tries`` failed before it (as the relay's
    ``Verifier._verdict``)."""
    return float(min(settings.verify_backoff_max_s, 2.0 * 2 ** min(tries, 16)))


def outlook(settings: Settings, s: dict[str, Any]) -> Outlook:
    """``s`` is a row of the ``console_schedule`` query."""
    now: datetime = s["now"]
    state = s["state"]
    out = Outlook()
    if state == "UNKNOWN":
        _unknown(settings, s, now, out)
    elif state == "STUCK":
        out.next.append(
            "Nothing, by itself: a STUCK effect waits for a person (resolve it: confirm, "
            "reject, redispatch or compensate)."
        )
    elif state == "PUBLISHED" and s["outcome_deadline"] is not None:
        out.next.append(
            f"The downstream's result is awaited on {s['result_topic'] or 'its result topic'} "
            f"until {when(s['outcome_deadline'], now)}; without one by then the reconciler "
            "makes it UNKNOWN and starts asking."
        )
    elif state == "PENDING":
        out.next.append(
            f"The relay publishes it once it is due ({when(s['available_at'], now)}) and every "
            "earlier effect of its ordering group is settled."
        )
    elif state == "DISPATCHING":
        out.next.append(
            f"A relay is publishing it; its claim lapses {when(s['lease_until'], now)}, after "
            "which an unfinished attempt counts as UNKNOWN."
        )
    return out


def _unknown(settings: Settings, s: dict[str, Any], now: datetime, out: Outlook) -> None:
    if s["observations"]:
        out.checked.append(
            f"The downstream was asked {s['observations']} time(s) (the observations are in the "
            f"evidence below); {s['observe_tries']} inconclusive answer(s) count toward "
            f"observe_max_tries ({settings.observe_max_tries})."
        )
    if not s["publication_known"]:
        out.checked.append(
            "The last attempt's publication is unknown: Kafka never acknowledged it (or the "
            f"relay stopped); {s['verify_tries']} check(s) of it in Kafka failed so far."
        )
        if settings.kafka_transactions:
            _verify(settings, s, now, out)
            return
    else:
        awaited = (
            f" the downstream's result, awaited on {s['result_topic']} for "
            f"{duration(float(s['outcome_timeout_s'] or 0))} (outcome_timeout_s), did not come"
            if s["result_topic"]
            else " whether the downstream acted on it is not known"
        )
        out.checked.append(f"It was published to Kafka (see the attempts);{awaited}.")
    _observe(settings, s, now, out)


def _verify(settings: Settings, s: dict[str, Any], now: datetime, out: Outlook) -> None:
    """kafka_transactions on: the relay looks for its own record in Kafka."""
    due = s["verify_at"] if s["verify_at"] is not None and s["verify_at"] > now else now
    out.next.append(
        f"A relay looks for the record in Kafka {when(due, now)} (once no relay holds the "
        "effect and the replica that made the attempt is its own or silent past its lease): "
        "found, it is PUBLISHED; provably absent, it goes back to PENDING for a new attempt."
    )
    left = settings.verify_max_tries - int(s["verify_tries"])
    at = due
    for tries in range(int(s["verify_tries"]), settings.verify_max_tries - 1):
        at += timedelta(seconds=verify_delay(settings, tries))
    out.stuck.append(
        f"If Kafka cannot be asked {left} more time(s) (verify_max_tries "
        f"{settings.verify_max_tries}), it goes STUCK at the last of them, about {when(at, now)}."
    )


def _observe(settings: Settings, s: dict[str, Any], now: datetime, out: Outlook) -> None:
    """The reconciler asks the type's observer."""
    if s["publication_known"]:
        due = s["observe_at"] or now
    else:
        # kafka_transactions off: observed once outcome_timeout_s has passed since it became
        # UNKNOWN, and no relay holds it.
        timeout = timedelta(seconds=float(s["outcome_timeout_s"] or 0.0))
        due = s["observe_at"] or s["updated_at"] + timeout
    due = max(due, now)
    if not s["has_observer"]:
        out.next.append(
            f"The reconciler looks at it {when(due, now)}: its type declares no observer, so "
            "nobody can be asked and it goes STUCK then, for a person to decide."
        )
        out.stuck.append(f"At that look: {when(due, now)}.")
        return
    tries = int(s["observe_tries"])
    out.next.append(
        f"The reconciler asks the type's observer {when(due, now)} (due now: at its next sweep, "
        f"every {settings.reconcile_interval_s:g}s). present: CONFIRMED; absent: re-dispatched "
        f"(PENDING), or STUCK once its {s['max_attempts']} attempts are spent (it has made "
        f"{s['attempts']}); duplicate: CONFIRMED with a compensation, or STUCK without one; "
        "inconclusive: asked again later."
    )
    left = settings.observe_max_tries - tries
    at = due
    for t in range(tries + 1, settings.observe_max_tries):
        at += timedelta(seconds=observe_delay(settings, t))
    out.stuck.append(
        f"If the observer stays inconclusive {left} more time(s) (observe_max_tries "
        f"{settings.observe_max_tries}), it goes STUCK at the last answer, about {when(at, now)}."
    )
