"""The body of each page: overview, lists, an effect's story, a decision's preview, sign-in,
audit. Built with :mod:`relay.console.render`, which escapes every value."""

from __future__ import annotations

from typing import Any

from relay.config import Settings
from relay.console import explain
from relay.console.decisions import LABELS, TARGET_OF, preview
from relay.console.queries import ALL_STATES, Filters
from relay.console.render import (
    Html,
    age,
    fmt,
    join,
    key_link,
    message,
    state_cell,
    table,
    url,
)
from relay.observability.alerts import rules
from relay.story import shown_payload

PAYLOAD_SHOWN = 20_000


def _alerts(alerts: dict[str, float], stats: list[dict[str, Any]]) -> Html:
    by_name = {r.alert: r for r in rules()}
    stuck = sum(int(r["effects"]) for r in stats if r["state"] == "STUCK")
    rejected = sum(int(r["effects"]) for r in stats if r["state"] == "REJECTED")
    unknown_age = alerts.get("oldest_unknown_age_s", 0.0)
    pending_age = alerts.get("oldest_pending_age_s", 0.0)
    parked = int(alerts.get("parked", 0))
    rows = [
        (
            "RelayUnknownEffectsTooOld",
            f"oldest UNKNOWN {age(unknown_age)}",
            unknown_age > 900,
            "/effects?state=UNKNOWN",
        ),
        ("RelayStuckEffects", f"{stuck} STUCK", stuck > 0, "/effects?state=STUCK"),
        (
            "RelayOrderingGroupsParked",
            f"{parked} parked group(s)",
            parked > 0,
            "/groups",
        ),
        (
            "RelayOutboxLagHigh",
            f"oldest due PENDING {age(pending_age)}",
            pending_age > 300,
            "/effects?state=PENDING",
        ),
        (
            "RelayPublishRejections",
            f"{rejected} REJECTED in all (the alert counts the last "
            "10 minutes' rejections at publication)",
            False,
            "/effects?state=REJECTED",
        ),
    ]
    body = join(
        fmt(
            '<tr class="{}"><td><code>{}</code></td><td>{}</td><td>{}</td>'
            '<td><a href="{}">list</a></td></tr>',
            "firing" if over else "",
            name,
            by_name[name].summary.replace("{{ $labels.effect_type }}", "a type"),
            value,
            link,
        )
        for name, value, over, link in rows
    )
    return fmt(
        "<h2>What the alerts watch</h2><table><thead><tr><th>alert</th><th>when it fires"
        "</th><th>now</th><th></th></tr></thead><tbody>{}</tbody></table>",
        body,
    )


def overview(data: dict[str, Any], refresh_s: int = 0) -> Html:
    stats = data["stats"]
    rows = [
        [
            fmt("{}", r["effect_type"]),
            state_cell(r["state"]),
            fmt(
                '<a href="{}">{}</a>',
                url("/effects", {"state": r["state"], "type": r["effect_type"]}),
                r["effects"],
            ),
            fmt("{}", age(r["oldest_age_s"])),
        ]
        for r in stats
    ]
    counts = table(["effect type", "state", "effects", "oldest change"], rows)
    return fmt(
        "{}<h2>Effects by type and state</h2><p>Finished effects (CONFIRMED, CANCELLED) are not "
        "counted here (<code>relay stats</code> counts them).</p>{}<p>{}</p>",
        _alerts(data["alerts"], stats),
        counts if stats else fmt("<p>No effects.</p>"),
        _refreshing(refresh_s),
    )


def _filters_form(action: str, f: Filters, types: list[str], states: tuple[str, ...]) -> Html:
    state_options = join(
        fmt(
            '<option value="{}"{}>{}</option>',
            s,
            Html(" selected" if s == f.state else ""),
            s or "any",
        )
        for s in ("", *states)
    )
    type_options = join(
        fmt(
            '<option value="{}"{}>{}</option>',
            t,
            Html(" selected" if t == f.effect_type else ""),
            t or "any",
        )
        for t in ("", *types)
    )
    return fmt(
        '<form class="filters" method="get" action="{}">'
        '<label>state<select name="state">{}</select></label>'
        '<label>type<select name="type">{}</select></label>'
        '<label>operation key<input name="key" value="{}"></label>'
        '<label>key contains<input name="key_part" value="{}"></label>'
        '<label>ordering group<input name="group" value="{}"></label>'
        '<label>unchanged for (15m, 2h, 1d)<input name="older_than" value="{}" size="6"></label>'
        '<label>error class (reason contains)<input name="error" value="{}"></label>'
        '<button type="submit">Filter</button> <a href="{}">clear</a></form>',
        action,
        state_options,
        type_options,
        f.key or "",
        f.key_part or "",
        f.group or "",
        f.older_than or "",
        f.error or "",
        action,
    )


def _pager(path: str, f: Filters, next_after: int | None) -> Html:
    parts = []
    if f.after:
        parts.append(fmt('<a href="{}">first page</a>', url(path, f.query_string(after=None))))
    if next_after is not None:
        parts.append(fmt('<a href="{}">next page</a>', url(path, f.query_string(after=next_after))))
    return fmt('<nav class="pages">{}</nav>', join(parts, " | "))


def effects_list(
    rows: list[dict[str, Any]],
    f: Filters,
    next_after: int | None,
    types: list[str],
    bulk: Html | None = None,
    refresh_s: int = 0,
) -> Html:
    shown = [
        [
            fmt("{}", r["id"]),
            key_link(r["operation_key"]),
            fmt("{}", r["effect_type"]),
            state_cell(r["state"]),
            fmt("{}", r["attempts"]),
            fmt("{} ({} ago)", r["updated_at"], age(r["age_s"])),
            fmt("{}", r["ordering_group"] or ""),
            fmt("{}", r["reason"] or ""),
        ]
        for r in rows
    ]
    found = (
        table(
            ["id", "operation key", "type", "state", "attempts", "last change", "group", "reason"],
            shown,
        )
        if rows
        else fmt("<p>No effect matches.</p>")
    )
    return fmt(
        "{}{}{}<p>Oldest first (by id); the filters are in the address: a link keeps them. "
        "{}</p>{}",
        _filters_form("/effects", f, types, ALL_STATES),
        found,
        _pager("/effects", f, next_after),
        _refreshing(refresh_s),
        bulk or Html(""),
    )


def _refreshing(refresh_s: int) -> str:
    if refresh_s:
        return f"This page reloads itself every {refresh_s} s: new effects appear without a click."
    return "Reload the page to see new effects."


def groups_list(
    rows: list[dict[str, Any]],
    f: Filters,
    next_after: int | None,
    types: list[str],
    refresh_s: int = 0,
) -> Html:
    shown = [
        [
            fmt(
                '<a href="{}">{}</a>',
                url("/effects", {"group": r["ordering_group"]}),
                r["ordering_group"],
            ),
            key_link(r["operation_key"]),
            fmt("{}", r["effect_type"]),
            state_cell(r["state"]),
            fmt("{}", r["waiting"]),
            fmt("{} ago", age(r["age_s"])),
            fmt("{}", r["reason"] or ""),
        ]
        for r in rows
    ]
    found = (
        table(["group", "blocked by", "type", "its state", "waiting", "blocked for", "why"], shown)
        if rows
        else fmt("<p>No parked group matches.</p>")
    )
    return fmt(
        "<p>A group is parked behind its latest REJECTED, UNKNOWN or STUCK effect while later "
        "effects of the group wait. Settling that effect releases it; so does a release (a "
        "REJECTED one) or a skip (UNKNOWN, STUCK) from the blocking effect's page.</p>{}{}{}"
        "<p>{}</p>",
        _filters_form("/groups", f, types, ("REJECTED", "UNKNOWN", "STUCK")),
        found,
        _pager("/groups", f, next_after),
        _refreshing(refresh_s),
    )


def _facts(pairs: list[tuple[str, object]]) -> Html:
    body = join(
        fmt("<tr><th>{}</th><td>{}</td></tr>", k, v if isinstance(v, Html) else fmt("{}", v))
        for k, v in pairs
    )
    return fmt('<table class="facts"><tbody>{}</tbody></table>', body)


def story(
    settings: Settings,
    found: dict[str, Any],
    *,
    may_decide: bool,
    decisions: list[str],
    why_not: str | None,
) -> Html:
    e, s = found["effect"], found["schedule"]
    facts: list[tuple[str, object]] = [
        ("operation key", fmt('<span class="key">{}</span>', e["operation_key"])),
        ("state", state_cell(e["state"])),
    ]
    for name in (
        "effect_type",
        "topic",
        "ordering_group",
        "business_key",
        "traceparent",
        "attempts",
        "reason",
    ):
        if e.get(name) is not None:
            facts.append((name.replace("_", " "), e[name]))
    facts += [("created", e["created_at"]), ("last change", e["updated_at"])]
    blocker = found.get("parked_behind")
    if blocker is not None:
        facts.append(
            (
                "PARKED",
                fmt(
                    "behind {} ({}{}): settling it, or releasing the group from its page, lets "
                    "this one go",
                    key_link(blocker["operation_key"]),
                    blocker["state"],
                    f": {blocker['reason']}" if blocker["reason"] else "",
                ),
            )
        )
    if found.get("blocks") is not None:
        facts.append(
            (
                "blocks",
                f"ordering group {e['ordering_group']}: {found['blocks']['waiting']} "
                "effect(s) wait behind it",
            )
        )
    if e.get("group_released_at") is not None:
        facts.append(
            (
                "released",
                f"{e['group_released_at']:%Y-%m-%d %H:%M:%S %Z}: its group went on "
                "without it; it is not published again",
            )
        )
    if e["published_offset"] is not None:
        facts.append(
            (
                "published",
                f"partition {e['published_partition']} offset "
                f"{e['published_offset']} at {e['published_at']:%Y-%m-%d %H:%M:%S %Z}",
            )
        )
    if e["outcome_deadline"] is not None:
        facts.append(("result due", e["outcome_deadline"]))
    payload = shown_payload(e["payload"], limit=PAYLOAD_SHOWN)
    if len(payload) > PAYLOAD_SHOWN:
        payload = payload[:PAYLOAD_SHOWN] + f"... ({len(payload)} characters in all)"
    parts = [fmt("<h2>Intent</h2>{}<h3>Payload</h3><pre>{}</pre>", _facts(facts), payload)]
    parts.append(_outlook(settings, s))
    parts.append(_decisions(e, may_decide, decisions, why_not))
    parts.append(_attempts(found["attempts"]))
    parts.append(_evidence(found["evidence"]))
    parts.append(_transitions(found["transitions"]))
    parts.append(
        fmt(
            '<p><a href="{}">Console decisions about it (audit)</a></p>',
            url("/audit", {"key": e["operation_key"]}),
        )
    )
    return join(parts)


def _outlook(settings: Settings, schedule: dict[str, Any] | None) -> Html:
    if schedule is None:
        return Html("")
    o = explain.outlook(settings, schedule)
    sections = [
        ("What has been checked", o.checked),
        ("What happens next, by itself", o.next),
        ("When it would go STUCK", o.stuck),
    ]
    body = join(
        fmt("<h3>{}</h3><ul>{}</ul>", title, join(fmt("<li>{}</li>", line) for line in lines))
        for title, lines in sections
        if lines
    )
    if not body:
        return Html("")
    return fmt(
        "<h2>Outlook</h2><div class=\"notice\">{}<p>From the effect's timers and this console's "
        "settings (the daemons' when they read the same configuration).</p></div>",
        body,
    )


def _decisions(
    e: dict[str, Any], may_decide: bool, decisions: list[str], why_not: str | None
) -> Html:
    if not decisions:
        return fmt("<h2>Decisions</h2><p>None is valid in state {}.</p>", e["state"])
    if not may_decide:
        return fmt("<h2>Decisions</h2><p>{}</p>", why_not or "")
    links = join(
        fmt(
            '<li><a href="{}">{}</a></li>',
            url("/decide", {"key": e["operation_key"], "action": a}),
            LABELS[a],
        )
        for a in decisions
    )
    return fmt(
        "<h2>Decisions</h2><p>Each shows what it will do before you confirm.</p><ul>{}</ul>", links
    )


def _attempts(attempts: list[dict[str, Any]]) -> Html:
    rows = [
        [
            fmt("#{}", a["attempt"]),
            fmt("{} (epoch {})", a["replica_id"], a["replica_epoch"]),
            fmt("{}", a["started_at"]),
            fmt("{}", a["outcome"] or "in flight"),
            fmt("{}", f"p{a['partition']}@{a['offset']}" if a["offset"] is not None else ""),
            fmt("{}", a["reason"] or ""),
            fmt(
                "{}",
                f"{a['verified_at']:%H:%M:%S}: {a['verification']}" if a["verification"] else "",
            ),
        ]
        for a in attempts
    ]
    if not rows:
        return fmt("<h2>Attempts</h2><p>None yet.</p>")
    return fmt(
        "<h2>Attempts</h2>{}",
        table(["attempt", "by", "started", "outcome", "Kafka", "reason", "checked in Kafka"], rows),
    )


def _evidence(evidence: list[dict[str, Any]]) -> Html:
    rows = []
    for v in evidence:
        facts = [
            f"external id {v['external_id']}" if v["external_id"] is not None else "",
            f"count {v['observed_count']}" if v["observed_count"] is not None else "",
            f"{v['topic']} p{v['partition']}@{v['offset']}" if v["topic"] is not None else "",
            f"attempt {v['attempt']}" if v["attempt"] is not None else "",
        ]
        who = fmt("{}", v["actor"])
        if v["kind"] == "operator":
            who = fmt(
                "{} (login {}, OS user {})", v["actor"], v["db_role"] or "?", v["os_user"] or "?"
            )
        rows.append(
            [
                fmt("{}", v["received_at"]),
                fmt("{}", v["kind"]),
                fmt("{}", v["outcome"] or "-"),
                fmt("{}", "; ".join(x for x in facts if x)),
                fmt("{}", v["verdict"]),
                who,
                fmt("{}", v["reason"] or ""),
                fmt(
                    "{}",
                    v["detail"] if v["detail"] and v["detail"] not in (v["reason"] or "") else "",
                ),
            ]
        )
    if not rows:
        return fmt("<h2>Evidence</h2><p>None.</p>")
    return fmt(
        "<h2>Evidence</h2>{}",
        table(["received", "kind", "outcome", "facts", "verdict", "by", "reason", "detail"], rows),
    )


def _transitions(transitions: list[dict[str, Any]]) -> Html:
    rows = [
        [
            fmt("{}", t["at"]),
            fmt("{}", t["from_state"] or "-"),
            state_cell(t["to_state"]),
            fmt("{}", t["actor"]),
            fmt("{}", t["reason"]),
        ]
        for t in transitions
    ]
    return fmt("<h2>Transitions</h2>{}", table(["at", "from", "to", "by", "reason"], rows))


def decide(settings: Settings, found: dict[str, Any], action: str, csrf: str) -> Html:
    e = found["effect"]
    lines = preview(settings, found, action)
    return fmt(
        "<p>Effect {} is <strong>{}</strong> (attempts {}, last change {}).</p>"
        "<h2>{}</h2><ul>{}</ul>"
        '<form method="post" action="/decide">'
        '<input type="hidden" name="csrf" value="{}">'
        '<input type="hidden" name="key" value="{}">'
        '<input type="hidden" name="action" value="{}">'
        '<input type="hidden" name="seen_state" value="{}">'
        '<input type="hidden" name="seen_updated_at" value="{}">'
        '<input type="hidden" name="seen_attempts" value="{}">'
        '<p><label>Reason (recorded with your name)<br><textarea name="reason" required>'
        "</textarea></label></p>"
        '<p><button type="submit">Confirm: {}</button> <a href="{}">back</a></p></form>'
        "<p>If the effect changes before you confirm, the decision is refused and you are "
        "shown what changed.</p>",
        key_link(e["operation_key"]),
        e["state"],
        e["attempts"],
        e["updated_at"],
        LABELS[action],
        join(fmt("<li>{}</li>", line) for line in lines),
        csrf,
        e["operation_key"],
        action,
        e["state"],
        e["updated_at"].isoformat(),
        e["attempts"],
        action,
        url("/effect", {"key": e["operation_key"]}),
    )


def outcome(applied: bool, text: str, key: str | None) -> Html:
    back = (
        fmt('<p><a href="{}">Back to the effect</a></p>', url("/effect", {"key": key}))
        if key
        else Html("")
    )
    kind = "applied" if applied else "refused"
    head = "Done" if applied else "Refused"
    return fmt("{}{}", message(kind, f"{head}: {text}"), back)


def login(error: str | None, csrf: str) -> Html:
    return fmt(
        '{}<form method="post" action="/login"><input type="hidden" name="csrf" value="{}">'
        '<p><label>Name<br><input name="name" autocomplete="username" required></label></p>'
        '<p><label>Password<br><input name="password" type="password" '
        'autocomplete="current-password" required></label></p>'
        '<p><button type="submit">Sign in</button></p></form>',
        message("refused", error) if error else Html(""),
        csrf,
    )


def audit(rows: list[dict[str, Any]], key: str | None, next_before: int | None) -> Html:
    shown = [
        [
            fmt("{}", r["at"]),
            fmt("{} ({}, {})", r["actor"], r["access"], r["auth"]),
            fmt("{}", r["client_address"] or ""),
            fmt("{}", r["action"]),
            key_link(r["operation_key"]) if r["operation_key"] else Html(""),
            fmt("<code>{}</code>", r["seen"]),
            fmt("{}", r["reason"] or ""),
            fmt(
                '<span class="state {}">{}</span>',
                "CONFIRMED" if r["outcome"] == "applied" else "STUCK",
                r["outcome"],
            ),
            fmt("{}", r["detail"] or ""),
        ]
        for r in rows
    ]
    pager = Html("")
    if next_before is not None:
        params = {"before": str(next_before), **({"key": key} if key else {})}
        pager = fmt('<nav class="pages"><a href="{}">older</a></nav>', url("/audit", params))
    return fmt(
        "<p>Every decision asked for in the console, applied or refused, newest first{}.</p>{}{}",
        f" (effect {key})" if key else "",
        table(
            [
                "at",
                "who",
                "from",
                "action",
                "effect",
                "what they saw",
                "reason",
                "outcome",
                "detail",
            ],
            shown,
        )
        if rows
        else fmt("<p>Nothing yet.</p>"),
        pager,
    )


def bulk_links(f: Filters, valid: list[str], cap: int) -> Html:
    """On a list an operator may decide from: one decision for every effect the filter finds."""
    if f.state is None:
        return fmt(
            "<p>Pick a state to decide for every effect the filter finds (up to {}).</p>", cap
        )
    if not valid:
        return Html("")
    links = join(
        fmt(
            '<li><a href="{}">{}</a></li>',
            url("/bulk", {**f.query_string(after=None), "action": a}),
            LABELS[a],
        )
        for a in valid
    )
    return fmt(
        '<div class="notice"><h2>Decide for every effect this filter finds</h2><p>Up to {}, '
        "the oldest first; each shows first how many and which.</p><ul>{}</ul></div>",
        cap,
        links,
    )


def bulk_preview(
    settings: Settings,
    rows: list[dict[str, Any]],
    more: bool,
    f: Filters,
    action: str,
    valid: list[bool],
    effects_json: str,
    csrf: str,
) -> Html:
    cap = settings.console_bulk_cap
    chosen = sum(valid)
    if more:
        count = fmt(
            "More than {} effects match: only the first {} (the oldest) are decided here; "
            "decide again, or narrow the filter, for the others.",
            cap,
            cap,
        )
    else:
        count = fmt("{} effect(s) match (the cap is {}).", len(rows), cap)
    shown = [
        [
            key_link(r["operation_key"]),
            fmt("{}", r["effect_type"]),
            state_cell(r["state"]),
            fmt("{}", r["attempts"]),
            fmt("{}", r["updated_at"]),
            fmt("{}", "yes" if ok else f"no: {action} is not valid in state {r['state']}"),
        ]
        for r, ok in zip(rows, valid, strict=True)
    ]
    back = url("/effects", f.query_string(after=None))
    form = Html("")
    if chosen:
        form = fmt(
            '<form method="post" action="/bulk">'
            '<input type="hidden" name="csrf" value="{}">'
            '<input type="hidden" name="action" value="{}">'
            '<input type="hidden" name="filter" value="{}">'
            '<input type="hidden" name="effects" value="{}">'
            '<p><label>Reason (recorded with your name on each)<br><textarea name="reason" '
            "required></textarea></label></p>"
            '<p><button type="submit">Apply {} to {} effect(s)</button> <a href="{}">back</a>'
            "</p></form>",
            csrf,
            action,
            back,
            effects_json,
            action,
            chosen,
            back,
        )
    return fmt(
        '<p class="count">{}</p><h2>{}</h2><p>For each effect: {}</p>{}{}'
        "<p>Each effect is checked again when you apply: one that changed since this page "
        "showed it is refused (and reported), the others are decided. Every one is audited.</p>",
        count,
        LABELS[action],
        join(fmt("{} ", line) for line in _bulk_preview_lines(action)),
        table(["operation key", "type", "state", "attempts", "last change", "decided"], shown),
        form,
    )


def _bulk_preview_lines(action: str) -> list[str]:
    if action == "cancel":
        return ["PENDING -> CANCELLED: it is never published."]
    lines = [f"-> {TARGET_OF[action]}."]
    if action == "redispatch":
        lines.append("The relay publishes it again: the downstream may receive it twice.")
    if action == "compensate":
        lines.append("A compensation effect is enqueued and published by the relay.")
    lines.append("Recorded as operator evidence and a transition, with your name and reason.")
    return lines


def bulk_outcome(results: list[tuple[str, bool, str]], back: str) -> Html:
    applied = sum(1 for _, ok, _ in results if ok)
    shown = [
        [
            key_link(key),
            fmt(
                '<span class="state {}">{}</span>',
                "CONFIRMED" if ok else "STUCK",
                "applied" if ok else "refused",
            ),
            fmt("{}", text),
        ]
        for key, ok, text in results
    ]
    return fmt(
        '{}{}<p><a href="{}">Back to the list</a></p>',
        message(
            "applied" if applied == len(results) else "refused",
            f"{applied} applied, {len(results) - applied} refused, of {len(results)}.",
        ),
        table(["operation key", "outcome", "detail"], shown),
        back,
    )
