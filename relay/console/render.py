"""The console's pages as server-rendered HTML, without a template engine.

Every value is escaped on its way in: :func:`fmt` takes a literal template and escapes each
argument that is not already :class:`Html` (control characters and bidirectional overrides are
written out first, so a key cannot reorder what a page shows). No inline script or style: the
CSP allows neither.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from datetime import datetime
from typing import Any, LiteralString
from urllib.parse import urlencode

from relay.redaction import escape_controls


class Html(str):
    """Text that is HTML already: inserted as is."""

    __slots__ = ()


def esc(value: object) -> Html:
    if isinstance(value, Html):
        return value
    if value is None:
        return Html("")
    if isinstance(value, datetime):
        value = f"{value:%Y-%m-%d %H:%M:%S %Z}"
    return Html(html.escape(escape_controls(str(value), keep_newlines=True), quote=True))


def fmt(template: LiteralString, *args: object) -> Html:
    """``template`` with each ``{}`` replaced by an escaped argument."""
    return Html(template.format(*(esc(a) for a in args)))


def join(parts: Iterable[Html], sep: LiteralString = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def url(path: str, params: dict[str, str] | None = None) -> str:
    """A link; the parameters URL-encoded (escaped again as HTML where it is inserted)."""
    return path + ("?" + urlencode(params) if params else "")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    from relay.console.explain import duration

    return duration(seconds)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
header { background: #233; color: #fff; padding: .6em 1em; display: flex; gap: 1.2em;
         align-items: center; flex-wrap: wrap; }
header a { color: #fff; text-decoration: none; }
header a.here { text-decoration: underline; }
header .who { margin-left: auto; font-size: .9em; }
header form { display: inline; }
main { padding: 1em 1.5em; max-width: 1400px; }
table { border-collapse: collapse; width: 100%; margin: .5em 0 1.5em; background: #fff; }
th, td { border: 1px solid #ccc; padding: .3em .5em; text-align: left; vertical-align: top;
         font-size: .92em; }
th { background: #eef; }
table.facts th { width: 12em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, .key { font-family: ui-monospace, monospace; word-break: break-all; }
pre { white-space: pre-wrap; background: #fff; border: 1px solid #ccc; padding: .5em; }
.state { font-weight: bold; }
.UNKNOWN { color: #a60; } .STUCK { color: #b00; } .REJECTED { color: #806; }
.CONFIRMED { color: #070; } .firing { background: #fdd; }
.notice { background: #ffd; border: 1px solid #cc9; padding: .6em; margin: .6em 0; }
.refused { background: #fdd; border: 1px solid #c99; padding: .6em; margin: .6em 0; }
.applied { background: #dfd; border: 1px solid #9c9; padding: .6em; margin: .6em 0; }
form.filters { display: flex; gap: .6em; flex-wrap: wrap; align-items: end; }
form.filters label { display: flex; flex-direction: column; font-size: .85em; }
textarea { width: 40em; max-width: 100%; height: 5em; }
nav.pages { margin: .5em 0; }
"""


def layout(
    title: str,
    body: Html,
    *,
    identity: Any = None,
    csrf: str | None = None,
    here: str = "",
    read_only: bool = False,
    refresh_s: int = 0,
) -> Html:
    tabs = [
        ("overview", "/", "Overview"),
        ("UNKNOWN", "/effects?state=UNKNOWN", "UNKNOWN"),
        ("STUCK", "/effects?state=STUCK", "STUCK"),
        ("REJECTED", "/effects?state=REJECTED", "REJECTED"),
        ("parked", "/groups", "Parked groups"),
        ("all", "/effects", "All effects"),
        ("audit", "/audit", "Audit"),
    ]
    links = join(
        fmt('<a href="{}"{}>{}</a>', link, Html(' class="here"' if name == here else ""), text)
        for name, link, text in tabs
    )
    who = Html("")
    if identity is not None:
        mode = " (read-only console)" if read_only else ""
        signout = Html("")
        if identity.auth == "login" and csrf:
            signout = fmt(
                '<form method="post" action="/logout"><input type="hidden" name="csrf" '
                'value="{}"><button type="submit">Sign out</button></form>',
                csrf,
            )
        who = fmt(
            '<span class="who">{} ({}){} {}</span>', identity.name, identity.right, mode, signout
        )
    return fmt(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">{}'
        '<title>{} - relay console</title><link rel="stylesheet" href="/static/console.css">'
        "</head><body><header><strong>relay console</strong>{}{}</header>"
        "<main><h1>{}</h1>{}</main></body></html>\n",
        # A meta refresh is no script: the CSP (script-src 'self') has nothing to say about it.
        fmt('<meta http-equiv="refresh" content="{}">', refresh_s) if refresh_s else Html(""),
        title,
        links,
        who,
        title,
        body,
    )


def state_cell(state: str) -> Html:
    return fmt('<span class="state {}">{}</span>', state if state.isalpha() else "", state)


def key_link(key: str) -> Html:
    return fmt('<a class="key" href="{}">{}</a>', url("/effect", {"key": key}), key)


def table(headers: list[str], rows: Iterable[list[Html]]) -> Html:
    head = join(fmt("<th>{}</th>", h) for h in headers)
    body = join(fmt("<tr>{}</tr>", join(fmt("<td>{}</td>", c) for c in row)) for row in rows)
    return fmt("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, body)


def message(kind: str, text: str) -> Html:
    return fmt('<div class="{}">{}</div>', kind, text)
