"""The alert rules, kept as data and rendered to ``ops/prometheus/relay-alerts.yml``.

The YAML file is what deployments ship (one plain Prometheus rules file); it is rendered from here
so that tests can build a faster copy (shorter ``for:``) of the very same rules without a YAML
library, and so that a test fails when the file and this source drift apart.

    python -m relay.observability.alerts > ops/prometheus/relay-alerts.yml

Multi-replica correctness: the outbox gauges (``relay_effects``, ``relay_oldest_*``) are read
from the database, so every replica of both daemons reports the same value; rules take ``max``
over them (never ``sum``). ``by (namespace)`` keeps separate deployments apart where Kubernetes
service discovery sets that label, and is harmless where it does not. Process counters
(``relay_*_total``) are summed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

RELAY_JOB = "outbox-relay"
RECONCILER_JOB = "outbox-relay-reconciler"
RUNBOOK = "docs/operations.md#"
# The console's page that lists what each alert fired on (``--console-url``): the runbook says
# what to do, the console is where it is done. Prometheus expands the label templates.
CONSOLE_PAGES = {
    "RelayUnknownEffectsTooOld": "effects?state=UNKNOWN",
    "RelayStuckEffects": "effects?state=STUCK&type={{ $labels.effect_type }}",
    "RelayOrderingGroupsParked": "groups",
    "RelayOutboxLagHigh": "effects?state=PENDING",
    "RelayPublishRejections": "effects?state=REJECTED",
    "RelayBatchesLeftUnsettled": "effects?state=UNKNOWN",
    "RelayOutboxMetricsFailing": "",
}


@dataclass(frozen=True)
class AlertRule:
    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    @property
    def runbook(self) -> str:
        return RUNBOOK + self.alert.lower()


def rules(
    *,
    unknown_age_s: int = 900,
    lag_s: int = 300,
    relay_job: str = RELAY_JOB,
    reconciler_job: str = RECONCILER_JOB,
) -> list[AlertRule]:
    daemons = f"{relay_job}|{reconciler_job}"
    return [
        AlertRule(
            alert="RelayUnknownEffectsTooOld",
            expr=f"max by (namespace) (relay_oldest_unknown_age_seconds) > {unknown_age_s}",
            for_="1m",
            severity="page",
            summary="An effect has been UNKNOWN for too long",
            description=(
                "The oldest UNKNOWN effect entered that state {{ $value | humanizeDuration }} ago: "
                "an attempt happened and nobody knows whether it took effect. The reconciler "
                "should have observed it by now."
            ),
        ),
        AlertRule(
            alert="RelayStuckEffects",
            expr='max by (namespace, effect_type) (relay_effects{state="STUCK"}) > 0',
            for_="0s",
            severity="page",
            summary="STUCK effects of type {{ $labels.effect_type }} wait for a person",
            description=(
                "{{ $value }} effect(s) of type {{ $labels.effect_type }} are STUCK: observation "
                "was inconclusive or its budget is spent. Only an operator can resolve them."
            ),
        ),
        AlertRule(
            alert="RelayOrderingGroupsParked",
            expr="max by (namespace) (relay_parked_groups) > 0",
            for_="10m",
            severity="ticket",
            summary="Ordering groups are parked behind a failed effect",
            description=(
                "{{ $value }} ordering group(s) wait behind a REJECTED, UNKNOWN or STUCK effect; "
                "their later effects are held back (every other group flows). They go on when "
                "the effect is settled, or by `relay unblock GROUP`."
            ),
        ),
        AlertRule(
            alert="RelayOutboxLagHigh",
            expr=f"max by (namespace) (relay_oldest_pending_age_seconds) > {lag_s}",
            for_="2m",
            severity="page",
            summary="The outbox is not being drained",
            description=(
                "The oldest due PENDING effect has waited {{ $value | humanizeDuration }} to be "
                "published."
            ),
        ),
        AlertRule(
            alert="RelayPublishRejections",
            expr=(
                "sum by (namespace) (increase(relay_transitions_total"
                '{from_state="DISPATCHING", to_state="REJECTED"}[10m])) > 0'
            ),
            for_="0s",
            severity="ticket",
            summary="Effects were REJECTED at publication",
            description=(
                "{{ $value | humanize }} effect(s) became REJECTED in the last 10 minutes: Kafka "
                "refused them, or attempts that published nothing ran out."
            ),
        ),
        AlertRule(
            alert="RelayBatchesLeftUnsettled",
            expr=(
                'sum by (namespace) (increase(relay_batches_settled_total{result="left"}[10m])) > 0'
            ),
            for_="15m",
            severity="ticket",
            summary="Batches left without an outcome cannot be settled by their receipts",
            description=(
                "For 15 minutes, batches left by a dead replica or by a lost answer could not be "
                "settled by one read of the receipts topic ({{ $value | humanize }} tries in the "
                "last 10 minutes): their intents go UNKNOWN and are looked for one by one. Kafka "
                "unreachable, the receipts topic missing or unreadable, or its retention shorter "
                "than a replica's absence."
            ),
        ),
        AlertRule(
            alert="RelayDaemonDown",
            expr=f'up{{job=~"{daemons}"}} == 0',
            for_="2m",
            severity="ticket",
            summary="{{ $labels.job }} replica {{ $labels.instance }} cannot be scraped",
            description="The replica is down or its /metrics endpoint does not answer.",
        ),
        AlertRule(
            alert="RelayNoLiveRelay",
            expr=f'absent(up{{job="{relay_job}"}} == 1)',
            for_="2m",
            severity="page",
            summary="No relay replica is up: nothing is being published",
            description=f"No target of job {relay_job} has answered a scrape.",
        ),
        AlertRule(
            alert="RelayNoLiveReconciler",
            expr=f'absent(up{{job="{reconciler_job}"}} == 1)',
            for_="5m",
            severity="page",
            summary="No reconciler replica is up: outcomes are not being reconciled",
            description=f"No target of job {reconciler_job} has answered a scrape.",
        ),
        AlertRule(
            alert="RelayOutboxMetricsFailing",
            expr="max by (namespace) (relay_effects_query_success) == 0",
            for_="5m",
            severity="ticket",
            summary="No replica can read the outbox for metrics: UNKNOWN/STUCK alerts are blind",
            description=(
                "Every replica's query of the outbox for /metrics fails; see the daemons' logs "
                "(metrics: outbox query failed)."
            ),
        ),
    ]


def _q(text: str) -> str:
    """A YAML scalar: single-quoted (no escapes at all) when possible, else double-quoted JSON."""
    if "'" not in text and "\n" not in text:
        return f"'{text}'"
    return json.dumps(text)


def render(
    rule_list: list[AlertRule] | None = None,
    *,
    for_overrides: Mapping[str, str] | None = None,
    console_url: str | None = None,
) -> str:
    """The rules file. ``for_overrides`` (alert name -> duration) is for test copies only.
    ``console_url``: the operator console's address; each alert that has a console page gets a
    ``console`` annotation linking to it, beside its runbook."""
    overrides = dict(for_overrides or {})
    base = console_url.rstrip("/") + "/" if console_url else None
    lines = [
        "# Alert rules of the outbox relay. Generated from relay/observability/alerts.py:",
        "#   python -m relay.observability.alerts > ops/prometheus/relay-alerts.yml",
        "# (--console-url URL adds links to the operator console's pages: docs/console.md).",
        f"# Scrape jobs are expected to be named {RELAY_JOB} and {RECONCILER_JOB}",
        "# (python -m relay.observability.alerts --relay-job X --reconciler-job Y for others).",
        "groups:",
        "  - name: outbox-relay",
        "    rules:",
    ]
    for rule in rule_list if rule_list is not None else rules():
        if rule.alert in overrides:
            rule = replace(rule, for_=overrides.pop(rule.alert))
        lines += [
            f"      - alert: {rule.alert}",
            f"        expr: {_q(rule.expr)}",
            f"        for: {rule.for_}",
            "        labels:",
            f"          severity: {rule.severity}",
            "        annotations:",
            f"          summary: {_q(rule.summary)}",
            f"          description: {_q(rule.description)}",
            f"          runbook: {_q(rule.runbook)}",
        ]
        if base is not None and rule.alert in CONSOLE_PAGES:
            lines.append(f"          console: {_q(base + CONSOLE_PAGES[rule.alert])}")
    if overrides:
        raise KeyError(f"no such alert: {sorted(overrides)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Print the relay's Prometheus alert rules.")
    parser.add_argument("--relay-job", default=RELAY_JOB)
    parser.add_argument("--reconciler-job", default=RECONCILER_JOB)
    parser.add_argument(
        "--console-url",
        help="the operator console's address (https://relay-console.example.com/): each alert "
        "links to the console page that lists what it fired on",
    )
    args = parser.parse_args(argv)
    if args.console_url and not args.console_url.startswith(("http://", "https://")):
        parser.error("--console-url must start with http:// or https://")
    sys.stdout.write(
        render(
            rules(relay_job=args.relay_job, reconciler_job=args.reconciler_job),
            console_url=args.console_url,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
