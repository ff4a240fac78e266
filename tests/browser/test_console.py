"""``relay console`` in a real browser (Debian's Chromium through Playwright) against the real
PostgreSQL and Kafka: an UNKNOWN made by the relay and the reconciler's deadline, its story, an
operator's decision and its evidence; a viewer, a cross-site POST, a decision on an effect that
moved, an identity header from an untrusted address, hostile text; no CSP violation anywhere.
Screenshots of every page go to tests/artifacts/console/."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest
from click.testing import CliRunner
from playwright.sync_api import Browser, expect
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import relay
from relay.cli import main
from relay.config import Settings
from relay.console.auth import Identity
from relay.console.decisions import Seen
from relay.console.decisions import apply as apply_decision
from relay.devtools.services import Services
from relay.dispatch.daemon import Relay
from relay.reconciler.deadlines import expire_deadlines
from relay.reconciler.resolve import Decision, resolve
from relay.roles import apply as apply_roles
from relay.sql import query
from tests import support
from tests.browser.conftest import (
    PASSWORD,
    Running,
    Watched,
    console_settings,
    start_console,
)
from tests.downstream import harness as h

HOSTILE_KEY = "k<script>alert('key')</script>\"'><img src=x onerror=alert(1)>"
HOSTILE_GROUP = "g<b onmouseover=alert(2)>"
HOSTILE_DETAIL = "</td></tr><script>alert('detail')</script><img src=x onerror=alert(3)> \u202eevil"


@pytest.fixture
def base(
    database_url: str, services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    h.isolate_from_environment(monkeypatch)
    types = h.wire_types(
        prefix, python_observer="tests.downstream.observers:observe", outcome_timeout_s=1.0
    )
    return h.reconciler_settings(
        database_url, services.kafka_bootstrap_servers, prefix, effect_types=types
    )


@pytest.fixture
def console(base: Settings, tmp_path: Path) -> Iterator[Running]:
    yield from start_console(console_settings(base, tmp_path))


def make_unknown(settings: Settings, keys: list[str]) -> None:
    """The real path: the relay publishes each wire to Kafka, no result comes, the reconciler's
    deadline sweep makes them UNKNOWN."""
    url = settings.require_database_url()
    with psycopg.connect(url) as conn:
        for i, key in enumerate(keys):
            relay.enqueue(conn, "wire", key, {**h.WIRE, "amount": i + 1})
        conn.commit()
    with support.running(Relay(settings)):
        support.wait_for(
            lambda: set(h.states(url, keys).values()) == {"PUBLISHED"}, 60, "publication"
        )
    with psycopg.connect(url, autocommit=True) as conn:

        def expired() -> bool:
            expire_deadlines(conn, "test-reconciler")
            return set(h.states(url, keys).values()) == {"UNKNOWN"}

        support.wait_for(expired, 30, "the deadlines to pass")


def sign_in(browser: Browser, console: Running, name: str) -> Watched:
    page = Watched(browser.new_page())
    page.page.goto(f"{console.url}/")
    expect(page.page).to_have_url(f"{console.url}/login")
    page.page.fill("input[name=name]", name)
    page.page.fill("input[name=password]", PASSWORD)
    page.page.click("button[type=submit]")
    expect(page.page.locator("header .who")).to_contain_text(name)
    return page


def rows(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def test_an_operator_resolves_an_unknown_and_the_database_keeps_who(
    base: Settings, console: Running, browser: Browser
) -> None:
    url = base.require_database_url()
    make_unknown(base, ["wire-1", "wire-2"])
    ((partition, offset),) = rows(
        url,
        "SELECT published_partition, published_offset FROM relay.effect"
        " WHERE operation_key = 'wire-1'",
    )
    w = sign_in(browser, console, "alice")
    page = w.page
    expect(page.locator("tr.firing", has_text="RelayUnknownEffectsTooOld")).to_have_count(0)
    expect(page.locator("table").first).to_contain_text("RelayUnknownEffectsTooOld")
    w.shot("overview")

    page.click("header >> text=UNKNOWN")
    expect(page.locator("tbody tr")).to_have_count(2)
    expect(page.locator("tbody")).to_contain_text("wire-1")
    w.shot("list-unknown")
    # The filters are in the address: a link with them shows the same list.
    page.goto(f"{console.url}/effects?state=UNKNOWN&key=wire-2")
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator("input[name=key]")).to_have_value("wire-2")

    page.goto(f"{console.url}/effects?state=UNKNOWN")
    page.click("text=wire-1")
    # The story: the attempt with its Kafka coordinates, what was checked, what happens next.
    attempts = page.locator("h2:has-text('Attempts') + table")
    expect(attempts).to_contain_text("acked")
    expect(attempts).to_contain_text(f"p{partition}@{offset}")
    expect(page.locator(".notice")).to_contain_text("did not come")
    expect(page.locator(".notice")).to_contain_text("asks the type's observer")
    expect(page.locator(".notice")).to_contain_text("it goes STUCK at the last answer")
    expect(page.locator("h2:has-text('Transitions') + table")).to_contain_text("UNKNOWN")
    w.shot("story-unknown")

    page.click("text=Confirm: it happened, once")
    expect(page.locator("main ul").first).to_contain_text("UNKNOWN -> CONFIRMED")
    page.fill("textarea[name=reason]", "bank statement shows it, ticket OPS-1")
    w.shot("decide-preview")
    page.click("button:has-text('Confirm: confirm')")
    expect(page.locator(".applied")).to_contain_text("now CONFIRMED")
    w.shot("decision-applied")

    assert h.state(url, "wire-1") == "CONFIRMED"
    evidence = rows(
        url,
        "SELECT kind, outcome, actor, detail FROM relay.evidence v JOIN relay.effect e"
        " ON e.id = v.effect_id WHERE e.operation_key = 'wire-1' AND kind = 'operator'",
    )
    assert evidence == [
        ("operator", "confirm", "alice [console]", "bank statement shows it, ticket OPS-1")
    ]
    audit = rows(
        url,
        "SELECT actor, access, client_address, action, seen->>'state', reason, outcome"
        " FROM relay.console_audit",
    )
    assert audit == [
        (
            "alice",
            "operator",
            "127.0.0.1",
            "confirm",
            "UNKNOWN",
            "bank statement shows it, ticket OPS-1",
            "applied",
        )
    ]
    with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM relay.console_audit")
    page.click("header >> text=Audit")
    expect(page.locator("tbody")).to_contain_text("bank statement shows it")
    w.shot("audit")
    assert w.violations == [] and w.dialogs == []


def test_a_viewer_reads_but_cannot_decide(
    base: Settings, console: Running, browser: Browser
) -> None:
    url = base.require_database_url()
    make_unknown(base, ["wire-v"])
    w = sign_in(browser, console, "victor")
    page = w.page
    page.goto(f"{console.url}/effect?key=wire-v")
    expect(page.locator("main")).to_contain_text("You have the viewer right")
    expect(page.locator("a:has-text('Confirm')")).to_have_count(0)
    w.shot("story-viewer")
    assert page.goto(f"{console.url}/decide?key=wire-v&action=confirm").status == 403  # type: ignore[union-attr]

    # A POST forged with the viewer's own session and CSRF token is refused by the server.
    page.goto(f"{console.url}/")
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    response = page.request.post(
        f"{console.url}/decide",
        form={
            "csrf": token or "",
            "key": "wire-v",
            "action": "confirm",
            "seen_state": "UNKNOWN",
            "seen_updated_at": "2000-01-01T00:00:00+00:00",
            "seen_attempts": "1",
            "reason": "viewer tries",
        },
        headers={"Origin": console.url, "Sec-Fetch-Site": "same-origin"},
    )
    assert response.status == 403
    assert "viewer right" in response.text()
    assert h.state(url, "wire-v") == "UNKNOWN"
    assert rows(url, "SELECT actor, access, outcome FROM relay.console_audit") == [
        ("victor", "viewer", "refused")
    ]
    assert w.violations == []


class _Evil(BaseHTTPRequestHandler):
    """Another site: its page posts a decision to the console as soon as it loads."""

    target = ""
    fields: ClassVar[dict[str, str | float | bool]] = {}

    def do_GET(self) -> None:
        inputs = "".join(
            f'<input type="hidden" name="{k}" value="{v}">' for k, v in self.fields.items()
        )
        body = (
            f'<html><body><form id="f" method="post" action="{self.target}">{inputs}</form>'
            '<script>document.getElementById("f").submit()</script></body></html>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_cross_site_post_is_refused(base: Settings, console: Running, browser: Browser) -> None:
    url = base.require_database_url()
    make_unknown(base, ["wire-x"])
    w = sign_in(browser, console, "alice")
    page = w.page
    page.goto(f"{console.url}/decide?key=wire-x&action=reject")
    fields: dict[str, str | float | bool] = {
        name: page.locator(f"main input[name={name}]").get_attribute("value") or ""
        for name in ("csrf", "key", "action", "seen_state", "seen_updated_at", "seen_attempts")
    }
    fields["reason"] = "forged"

    # With the session and even the right CSRF token, a request from another origin is refused.
    forged = page.request.post(
        f"{console.url}/decide",
        form=fields,
        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert forged.status == 403 and "cross-site request refused" in forged.text()

    # A real page on another site (localhost is not 127.0.0.1) submitting a form to the console:
    # the browser sends no SameSite=Strict cookie and says cross-site; refused either way.
    _Evil.target, _Evil.fields = f"{console.url}/decide", fields
    evil = ThreadingHTTPServer(("127.0.0.1", 0), _Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with page.expect_navigation(url=f"{console.url}/decide"):
            page.goto(f"http://localhost:{evil.server_address[1]}/")
        expect(page.locator(".refused")).to_be_visible()
        w.shot("refused-cross-site")
    finally:
        evil.shutdown()
    assert h.state(url, "wire-x") == "UNKNOWN"
    outcomes = rows(url, "SELECT outcome, detail FROM relay.console_audit ORDER BY id")
    assert [o for o, _ in outcomes] == ["refused", "refused"]
    assert "cross-site" in outcomes[0][1]


def test_a_decision_on_an_effect_that_moved_is_refused_with_what_changed(
    base: Settings, console: Running, browser: Browser
) -> None:
    url = base.require_database_url()
    make_unknown(base, ["wire-m"])
    w = sign_in(browser, console, "alice")
    page = w.page
    page.goto(f"{console.url}/decide?key=wire-m&action=confirm")
    page.fill("textarea[name=reason]", "looks done")
    # Meanwhile someone else decides, from the CLI's code.
    with psycopg.connect(url, autocommit=True) as conn:
        resolve(conn, base, "wire-m", Decision.REJECT, reason="downstream says no", actor="bob")
    page.click("button:has-text('Confirm: confirm')")
    refused = page.locator(".refused")
    expect(refused).to_contain_text("state UNKNOWN -> REJECTED")
    expect(refused).to_contain_text("by bob")
    w.shot("refused-moved")
    assert h.state(url, "wire-m") == "REJECTED"
    assert rows(url, "SELECT actor, outcome, seen->>'state' FROM relay.console_audit") == [
        ("alice", "refused", "UNKNOWN")
    ]
    assert w.violations == []


def test_proxy_mode_trusts_the_header_only_from_the_proxy(
    base: Settings, browser: Browser, tmp_path: Path
) -> None:
    settings = console_settings(
        base,
        tmp_path,
        console_auth="proxy",
        console_proxy_addresses=["127.0.0.1"],
        console_operators=["olivia"],
    )
    for running in start_console(settings):
        context = browser.new_context(extra_http_headers={"X-Forwarded-User": "olivia"})
        w = Watched(context.new_page())
        w.page.goto(f"{running.url}/")
        expect(w.page.locator("header .who")).to_contain_text("olivia (operator)")
        context.close()

        # From 127.0.0.2, an address that is not a configured proxy, the header is ignored.
        conn = http.client.HTTPConnection(
            "127.0.0.1", running.server.port, timeout=10, source_address=("127.0.0.2", 0)
        )
        conn.request("GET", "/effects", headers={"X-Forwarded-User": "olivia"})
        answer = conn.getresponse()
        text = answer.read().decode()
        assert answer.status == 401 and "No identity" in text and "olivia" not in text
        conn.close()
        assert w.violations == []

    # Proxy mode without the proxies' addresses does not start.
    env = {n: None for n in ("RELAY_CONFIG",)} | {
        "RELAY_DATABASE_URL": base.require_database_url(),
        "RELAY_CONSOLE_AUTH": "proxy",
    }
    result = CliRunner(env=env).invoke(main, ["console", "--port", str(support.free_port())])
    assert result.exit_code == 2
    assert "console_proxy_addresses is empty" in result.output


def test_hostile_text_is_shown_escaped(base: Settings, console: Running, browser: Browser) -> None:
    url = base.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue(
            conn,
            "wire",
            HOSTILE_KEY,
            {
                **h.WIRE,
                "account": "<img src=x onerror=alert(4)>",
                "note": "</pre><script>x()</script>",
            },
            ordering_group=HOSTILE_GROUP,
        )
        relay.enqueue(
            conn, "wire", "after-hostile", {**h.WIRE, "amount": 7}, ordering_group=HOSTILE_GROUP
        )
        relay.enqueue(conn, "email", "too-deep", {"to": "a"})
        conn.commit()
    support.read_intake(url)  # the effect rows exist once the relay has read the intents
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE relay.effect SET state = 'STUCK', attempts = 1, reason = %s"
            " WHERE operation_key = %s",
            (HOSTILE_DETAIL, HOSTILE_KEY),
        )
        effect_id = conn.execute(
            "SELECT id FROM relay.effect WHERE operation_key = %s", (HOSTILE_KEY,)
        ).fetchone()
        assert effect_id is not None
        conn.execute(
            query("insert_evidence"),
            {
                "kind": "observation",
                "effect_id": effect_id[0],
                "operation_key": HOSTILE_KEY,
                "outcome": "inconclusive",
                "external_id": "<script>alert(5)</script>",
                "observed_count": None,
                "detail": HOSTILE_DETAIL,
                "attempt": 1,
                "verdict": "applied",
                "reason": "observation 1 inconclusive",
                "actor": "reconciler",
                "os_user": None,
            },
        )
        # A payload nested deeper than any JSON parser here goes (written before the limits).
        conn.execute(
            "UPDATE relay.effect SET payload = (%s)::jsonb WHERE operation_key = 'too-deep'",
            ('{"a": ' + "[" * 5000 + "]" * 5000 + "}",),
        )
    w = sign_in(browser, console, "alice")
    page = w.page
    page.goto(f"{console.url}/effects?state=STUCK")
    expect(page.locator("tbody")).to_contain_text(HOSTILE_KEY)
    w.shot("list-stuck-hostile")
    page.goto(f"{console.url}/groups")
    expect(page.locator("tbody")).to_contain_text(HOSTILE_GROUP)
    expect(page.locator("tbody")).to_contain_text("1")
    w.shot("groups")
    page.click(f"text={HOSTILE_KEY}")
    main_text = page.locator("main").inner_text()
    assert "<script>alert('detail')</script>" in main_text
    assert "\\u202e" in main_text  # the override is written out, not obeyed
    assert "<img src=x onerror=alert(4)>" in main_text
    assert "</pre><script>x()</script>" in main_text
    expect(page.locator("main img")).to_have_count(0)
    expect(page.locator("script")).to_have_count(0)
    expect(page.locator("main")).to_contain_text("Skip it")
    w.shot("story-hostile")
    page.goto(f"{console.url}/effect?key=too-deep")
    expect(page.locator("pre")).to_contain_text("cannot be decoded: RecursionError")
    # Parameters the database cannot hold are refused, not crashed on.
    assert page.goto(f"{console.url}/effect?key=a%00b").status == 400  # type: ignore[union-attr]
    assert page.goto(f"{console.url}/effects?after=x").status == 400  # type: ignore[union-attr]
    assert w.violations == [] and w.dialogs == []


def test_sign_in_page(console: Running, browser: Browser) -> None:
    w = Watched(browser.new_page())
    w.page.goto(f"{console.url}/login")
    w.page.fill("input[name=name]", "alice")
    w.page.fill("input[name=password]", "wrong password")
    w.page.click("button[type=submit]")
    expect(w.page.locator(".refused")).to_contain_text("Wrong name or password")
    w.shot("login")
    cookie = w.page.context.cookies()[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert w.violations == []


# --- Issue 22's second slice: the viewer's own login, bulk decisions, pages that reload ------


@pytest.fixture
def viewer_login(base: Settings, prefix: str) -> Iterator[str]:
    """A login in relay roles' <prefix>viewer role (roles are cluster-wide: dropped after)."""
    url = base.require_database_url()
    role_prefix = f"{prefix.lower()}_"
    with psycopg.connect(url, autocommit=True) as conn:
        names = apply_roles(conn, role_prefix)
        conn.execute(f'CREATE ROLE "{names["viewer"]}_login" LOGIN IN ROLE "{names["viewer"]}"')
    try:
        yield make_conninfo(url, user=f"{names['viewer']}_login")
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for role in [f"{names['viewer']}_login", *names.values()]:
                conn.execute(f'DROP OWNED BY "{role}"')
                conn.execute(f'DROP ROLE "{role}"')


def set_state(url: str, key: str, state: str) -> None:
    support.read_intake(url)  # the effect row exists once the relay has read the intent
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE relay.effect SET state = %s, attempts = 1 WHERE operation_key = %s",
            (state, key),
        )


def test_a_viewer_reads_with_a_login_that_cannot_write(
    base: Settings, viewer_login: str, browser: Browser, tmp_path: Path
) -> None:
    url = base.require_database_url()
    with psycopg.connect(url) as conn:
        relay.enqueue(conn, "wire", "wire-r", h.WIRE)
        conn.commit()
    set_state(url, "wire-r", "UNKNOWN")
    settings = console_settings(base, tmp_path, console_viewer_database_url=viewer_login)
    for running in start_console(settings):
        w = sign_in(browser, running, "victor")
        page = w.page
        # Every page a viewer sees runs under the viewer's login (SELECT only): all of them load.
        for path in ("/", "/effects?state=UNKNOWN", "/groups", "/effect?key=wire-r", "/audit"):
            assert page.goto(f"{running.url}{path}").status == 200, path  # type: ignore[union-attr]
        expect(page.locator("main")).to_contain_text("Nothing yet")
        viewer_user = conninfo_to_dict(viewer_login)["user"]
        used = rows(
            url,
            "SELECT DISTINCT usename FROM pg_stat_activity"
            " WHERE application_name = 'relay-console-viewer'",
        )
        assert used == [(viewer_user,)]

        # A forged POST with the viewer's session and token: refused by the console, audited
        # through the operator's login (the viewer's writes nothing).
        page.goto(f"{running.url}/")
        token = page.locator("input[name=csrf]").first.get_attribute("value")
        forged = page.request.post(
            f"{running.url}/decide",
            form={
                "csrf": token or "",
                "key": "wire-r",
                "action": "reject",
                "seen_state": "UNKNOWN",
                "seen_updated_at": "2000-01-01T00:00:00+00:00",
                "seen_attempts": "1",
                "reason": "viewer forges",
            },
            headers={"Origin": running.url, "Sec-Fetch-Site": "same-origin"},
        )
        assert forged.status == 403
        audit = rows(url, "SELECT actor, outcome, db_role FROM relay.console_audit")
        assert audit == [("victor", "refused", conninfo_to_dict(url)["user"])]

        # Had the request got past the console's checks, the database refuses it: the decision
        # code itself, on a connection of the viewer's pool, changes nothing.
        with running.server.viewer_pool.connection() as viewer:  # type: ignore[union-attr]
            found = viewer.execute(
                "SELECT updated_at FROM relay.effect WHERE operation_key = 'wire-r'"
            ).fetchone()
            assert found is not None
            (at,) = found
            with psycopg.connect(url, autocommit=True) as operator:
                outcome = apply_decision(
                    viewer,
                    base,
                    Identity("victor", "operator", "login", "forged"),
                    "127.0.0.1",
                    "wire-r",
                    "reject",
                    Seen("UNKNOWN", at.isoformat(), 1),
                    "forged past the checks",
                    audit_conn=operator,
                )
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                viewer.execute("UPDATE relay.effect SET state = 'CONFIRMED'")
        assert not outcome.applied and "may not do this" in outcome.message
        assert h.state(url, "wire-r") == "UNKNOWN"
        assert w.violations == []


def test_an_operator_decides_in_bulk_over_a_filter(
    base: Settings, browser: Browser, tmp_path: Path
) -> None:
    url = base.require_database_url()
    make_unknown(base, ["wire-b1", "wire-b2", "wire-b3"])
    for running in start_console(console_settings(base, tmp_path, console_bulk_cap=2)):
        w = sign_in(browser, running, "alice")
        page = w.page
        page.goto(f"{running.url}/effects?state=UNKNOWN")
        expect(page.locator("tbody tr")).to_have_count(3)
        page.click(".notice >> text=Reject: it did not happen; give up")
        expect(page.locator(".count")).to_contain_text("More than 2 effects match")
        expect(page.locator("tbody tr")).to_have_count(2)
        expect(page.locator("button[type=submit]", has_text="Apply reject to 2")).to_have_count(1)
        page.fill("textarea[name=reason]", "bank has no trace of them, OPS-7")
        w.shot("bulk-preview")
        # Meanwhile someone settles one of them from the CLI's code.
        with psycopg.connect(url, autocommit=True) as conn:
            resolve(conn, base, "wire-b1", Decision.CONFIRM, reason="found it", actor="bob")
        page.click("button:has-text('Apply reject to 2')")
        expect(page.locator(".refused")).to_contain_text("1 applied, 1 refused, of 2")
        table_text = page.locator("main table").inner_text()
        assert "state UNKNOWN -> CONFIRMED" in table_text and "by bob" in table_text
        w.shot("bulk-outcome")
        assert h.states(url, ["wire-b1", "wire-b2", "wire-b3"]) == {
            "wire-b1": "CONFIRMED",
            "wire-b2": "REJECTED",
            "wire-b3": "UNKNOWN",
        }
        audit = rows(
            url,
            "SELECT operation_key, action, outcome, detail LIKE '%%[bulk reject of 2]'"
            " FROM relay.console_audit ORDER BY id",
        )
        assert audit == [
            ("wire-b1", "reject", "refused", True),
            ("wire-b2", "reject", "applied", True),
        ]
        # A bulk POST over the cap is refused whole (and audited).
        token = page.locator("input[name=csrf]").first.get_attribute("value")
        over = page.request.post(
            f"{running.url}/bulk",
            form={
                "csrf": token or "",
                "action": "reject",
                "reason": "too many",
                "effects": '[["wire-b3", "UNKNOWN", "2000-01-01T00:00:00+00:00", 1],'
                ' ["a", "UNKNOWN", "2000-01-01T00:00:00+00:00", 1],'
                ' ["b", "UNKNOWN", "2000-01-01T00:00:00+00:00", 1]]',
            },
            headers={"Origin": running.url, "Sec-Fetch-Site": "same-origin"},
        )
        assert over.status == 403 and "more than the cap of 2" in over.text()
        assert h.state(url, "wire-b3") == "UNKNOWN"
        assert w.violations == [] and w.dialogs == []


def test_lists_and_the_overview_reload_themselves(
    base: Settings, browser: Browser, tmp_path: Path
) -> None:
    url = base.require_database_url()
    for running in start_console(console_settings(base, tmp_path, console_refresh_s=1)):
        w = sign_in(browser, running, "alice")
        page = w.page
        expect(page.locator('meta[http-equiv="refresh"]')).to_have_attribute("content", "1")
        page.goto(f"{running.url}/effects?state=UNKNOWN")
        expect(page.locator("main")).to_contain_text("No effect matches")
        with psycopg.connect(url) as conn:
            relay.enqueue(conn, "wire", "wire-late", h.WIRE)
            conn.commit()
        set_state(url, "wire-late", "UNKNOWN")
        # No click, no reload by the test: the page reloads itself (a meta refresh, no script,
        # nothing the CSP refuses).
        expect(page.locator("tbody")).to_contain_text("wire-late", timeout=10_000)
        assert page.url == f"{running.url}/effects?state=UNKNOWN"
        # A story or a decision's form is not reloaded under the operator's hands.
        page.goto(f"{running.url}/effect?key=wire-late")
        expect(page.locator('meta[http-equiv="refresh"]')).to_have_count(0)
        assert w.violations == []
