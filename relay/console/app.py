"""The console's ASGI application (Starlette): routes, the checks every request passes, the
security headers of every response.

Reads need the viewer right, decisions the operator right (and the console not read-only). A
POST is refused unless it comes from the console's own page (``Sec-Fetch-Site: same-origin``,
else an ``Origin`` naming this host) and carries the CSRF token of the browser's session.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.config import Settings
from relay.console import decisions, pages, queries
from relay.console.audit import record
from relay.console.auth import COOKIE, SECURE_COOKIE, Guard, Identity, same_origin
from relay.console.render import STYLE, Html, layout, message
from relay.logs import redact

log = logging.getLogger(__name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
MAX_FORM_BYTES = 1024 * 1024  # a bulk decision carries what the page showed of each effect
MAX_PARAM_CHARS = 1024
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# Sign-in failures per client address before it must wait (a brute-force brake).
MAX_FAILURES, FAILURE_WINDOW_S = 10, 900.0


class SecurityHeaders:
    """Adds the CSP and its companions to every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                taken = {name for name, _ in SECURITY_HEADERS}
                kept = [(n, v) for n, v in msg.get("headers", []) if n.lower() not in taken]
                msg["headers"] = kept + SECURITY_HEADERS
            await send(msg)

        await self.app(scope, receive, with_headers)


class BadRequest(Exception):
    pass


@dataclass
class Context:
    """One request as the handlers see it."""

    request: Request
    form: dict[str, str]
    identity: Identity | None
    session: tuple[str, str]  # (user name, nonce) of the browser's session
    new_cookie: str | None  # to set on the response (a new or renewed session)
    csrf: str

    @property
    def client(self) -> str | None:
        return self.request.client.host if self.request.client else None

    def param(self, name: str) -> str | None:
        value = self.request.query_params.get(name)
        return _clean(value)


def _clean(value: str | None) -> str | None:
    """A parameter, or None when empty; refused when it cannot be a database value."""
    if value is None or value.strip() == "":
        return None
    if "\x00" in value or len(value) > MAX_PARAM_CHARS:
        raise BadRequest("a parameter holds a NUL character or is too long")
    return value


def parse_age(text: str | None) -> float | None:
    if text is None:
        return None
    match = _DURATION.match(text.strip())
    if not match:
        raise BadRequest(f"{text!r} is not an age like 30s, 15m, 2h or 1d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


class Console:
    """The application's state: settings, the identity rules, the database pool."""

    def __init__(
        self,
        settings: Settings,
        guard: Guard,
        pool: ConnectionPool[Any],
        viewer_pool: ConnectionPool[Any] | None = None,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.pool = pool  # the operator's login: decisions and the audit
        self.viewer_pool = viewer_pool or pool  # what a viewer's requests read with
        self.failures: dict[str, deque[float]] = {}
        self.types: list[str] = sorted(settings.effect_types)

    def reader(self, ctx: Context) -> ConnectionPool[Any]:
        """The pool a request reads with: the operator's login for an operator, the viewer's
        (SELECT only, with console_viewer_database_url) for everyone else."""
        if ctx.identity is not None and ctx.identity.right == "operator":
            return self.pool
        return self.viewer_pool

    # -- plumbing ------------------------------------------------------------------------------

    def context(self, request: Request, form: dict[str, str]) -> Context:
        cookie = request.cookies.get(SECURE_COOKIE) or request.cookies.get(COOKIE)
        session = self.guard.read_session(cookie)
        new_cookie = None
        if session is None:
            new_cookie = self.guard.make_session()
            session = self.guard.read_session(new_cookie)
            assert session is not None
        peer = request.client.host if request.client else None
        identity = self.guard.identify(request.headers, peer, session)
        if (
            self.guard.mode == "proxy"
            and identity is None
            and request.headers.get(self.guard.header)
        ):
            log.warning(
                "console: identity header from %s ignored: not a configured proxy address", peer
            )
        anonymous = Identity(session[0], "viewer", self.guard.mode, session[1])
        csrf = self.guard.csrf_token(identity or anonymous)
        return Context(request, form, identity, session, new_cookie, csrf)

    def page(
        self,
        ctx: Context,
        title: str,
        body: Html,
        *,
        here: str = "",
        status: int = 200,
        refresh: bool = False,
    ) -> Response:
        return Response(
            layout(
                title,
                body,
                identity=ctx.identity,
                csrf=ctx.csrf,
                here=here,
                read_only=self.settings.console_read_only,
                refresh_s=self.settings.console_refresh_s if refresh else 0,
            ),
            status_code=status,
            media_type="text/html; charset=utf-8",
        )

    def finish(self, ctx: Context, response: Response) -> Response:
        if ctx.new_cookie is not None:
            self.set_cookie(ctx.request, response, ctx.new_cookie)
        return response

    def set_cookie(self, request: Request, response: Response, value: str) -> None:
        secure = self.settings.console_cookie_secure or request.url.scheme == "https"
        response.set_cookie(
            SECURE_COOKIE if secure else COOKIE,
            value,
            max_age=int(self.settings.console_session_s),
            path="/",
            secure=secure,
            httponly=True,
            samesite="strict",
        )

    def handle(
        self,
        request: Request,
        form: dict[str, str],
        handler: Callable[[Context], Response],
        *,
        post: bool,
    ) -> Response:
        try:
            ctx = self.context(request, form)
        except BadRequest as exc:
            return PlainTextResponse(f"bad request: {exc}", status_code=400)
        try:
            if ctx.identity is None and handler.__name__ not in ("login", "login_form"):
                return self.finish(ctx, self.unauthenticated(ctx, post=post))
            return self.finish(ctx, handler(ctx))
        except BadRequest as exc:
            return self.finish(
                ctx, self.page(ctx, "Bad request", message("refused", str(exc)), status=400)
            )
        except (PoolTimeout, psycopg.OperationalError) as exc:
            log.warning("console: database unavailable: %s", redact(str(exc)).splitlines()[0])
            body = message("refused", "PostgreSQL cannot be reached; try again shortly.")
            return self.finish(ctx, self.page(ctx, "Database unavailable", body, status=503))

    def unauthenticated(self, ctx: Context, *, post: bool) -> Response:
        if post and ctx.request.url.path in ("/decide", "/bulk"):
            self.audit_refusal(
                ctx,
                "not signed in (or the identity header came from an address "
                "that is not a configured proxy)",
            )
        if self.guard.mode == "login":
            if post:
                return self.page(ctx, "Sign in", message("refused", "Sign in first."), status=401)
            return RedirectResponse("/login", status_code=303)
        body = message(
            "refused",
            "No identity: the console is reached through its authenticating proxy only.",
        )
        return self.page(ctx, "Not signed in", body, status=401)

    def audit_refusal(self, ctx: Context, why: str, *, action: str | None = None) -> None:
        """A refused decision is audited too (who, if known; from where; what they sent)."""
        form = ctx.form
        seen: dict[str, Any] = {
            "state": form.get("seen_state"),
            "updated_at": form.get("seen_updated_at"),
            "attempts": form.get("seen_attempts"),
        }
        try:
            with self.pool.connection() as conn, conn.transaction():
                record(
                    conn,
                    identity=ctx.identity,
                    client=ctx.client,
                    action=action or form.get("action") or "?",
                    operation_key=form.get("key"),
                    seen=seen,
                    reason=form.get("reason"),
                    outcome="refused",
                    detail=why,
                )
        except psycopg.Error as exc:
            log.error("console: a refused decision could not be audited: %s", exc)

    def check_post(self, ctx: Context) -> str | None:
        """Why a POST is refused before anything else, or None."""
        if not same_origin(ctx.request.headers, ctx.request.headers.get("host")):
            return "cross-site request refused: it did not come from the console's own page"
        token = ctx.form.get("csrf") or ""
        if not hmac.compare_digest(token.encode(), ctx.csrf.encode()):
            return "missing or wrong CSRF token: reload the page and try again"
        return None

    # -- pages ---------------------------------------------------------------------------------

    def overview(self, ctx: Context) -> Response:
        with self.reader(ctx).connection() as conn:
            data = queries.overview(conn)
        return self.page(
            ctx,
            "What needs a person",
            pages.overview(data, self.settings.console_refresh_s),
            here="overview",
            refresh=True,
        )

    def filters(self, ctx: Context) -> queries.Filters:
        after = ctx.param("after")
        if after is not None and not after.isdigit():
            raise BadRequest("after must be an effect id")
        state = ctx.param("state")
        older = ctx.param("older_than")
        return queries.Filters(
            state=state.upper() if state else None,
            effect_type=ctx.param("type"),
            group=ctx.param("group"),
            key=ctx.param("key"),
            key_part=ctx.param("key_part"),
            error=ctx.param("error"),
            older_than=older,
            older_than_s=parse_age(older),
            after=int(after or 0),
        )

    def effects(self, ctx: Context) -> Response:
        f = self.filters(ctx)
        with self.reader(ctx).connection() as conn:
            rows, more = queries.page(conn, "console_effects", f, self.settings.console_page_size)
        title = f"{f.state} effects" if f.state else "Effects"
        bulk = None
        assert ctx.identity is not None
        if self.guard.may_decide(ctx.identity):
            bulk = pages.bulk_links(f, self.bulk_actions(f), self.settings.console_bulk_cap)
        body = pages.effects_list(rows, f, more, self.types, bulk, self.settings.console_refresh_s)
        return self.page(ctx, title, body, here=f.state if f.state else "all", refresh=True)

    def groups(self, ctx: Context) -> Response:
        f = self.filters(ctx)
        with self.reader(ctx).connection() as conn:
            rows, more = queries.page(
                conn, "console_parked_groups", f, self.settings.console_page_size
            )
        return self.page(
            ctx,
            "Parked ordering groups",
            pages.groups_list(rows, f, more, self.types, self.settings.console_refresh_s),
            here="parked",
            refresh=True,
        )

    def _story(self, ctx: Context, key: str | None) -> dict[str, Any] | None:
        if key is None:
            raise BadRequest("which effect? (key=...)")
        with self.reader(ctx).connection() as conn:
            return queries.story(conn, key)

    def effect(self, ctx: Context) -> Response:
        key = ctx.param("key")
        found = self._story(ctx, key)
        if found is None:
            return self.page(
                ctx,
                "No such effect",
                message("refused", f"No effect has operation key {key!r}."),
                status=404,
            )
        assert ctx.identity is not None
        valid = decisions.actions(self.settings, found["effect"], found["blocks"])
        why_not = None
        if self.settings.console_read_only:
            why_not = (
                "This console is read-only: decisions are taken elsewhere (relay resolve, "
                "relay unblock, relay cancel)."
            )
        elif ctx.identity.right != "operator":
            why_not = "You have the viewer right: decisions are for operators."
        body = pages.story(
            self.settings,
            found,
            may_decide=self.guard.may_decide(ctx.identity),
            decisions=valid,
            why_not=why_not,
        )
        return self.page(ctx, f"Effect {found['effect']['id']}", body)

    def decide_form(self, ctx: Context) -> Response:
        assert ctx.identity is not None
        if not self.guard.may_decide(ctx.identity):
            return self.page(
                ctx,
                "Not allowed",
                message(
                    "refused",
                    "Decisions need the operator right and a console that is not read-only.",
                ),
                status=403,
            )
        key, action = ctx.param("key"), ctx.param("action") or ""
        found = self._story(ctx, key)
        if found is None:
            return self.page(
                ctx, "No such effect", message("refused", "No such effect."), status=404
            )
        if action not in decisions.actions(self.settings, found["effect"], found["blocks"]):
            state = found["effect"]["state"]
            text = f"{action!r} is not a decision valid for an effect in state {state}."
            return self.page(ctx, "Not valid now", message("refused", text), status=409)
        return self.page(ctx, "Decide", pages.decide(self.settings, found, action, ctx.csrf))

    def decide(self, ctx: Context) -> Response:
        refused = self.check_post(ctx)
        if refused is None and ctx.identity is not None and not self.guard.may_decide(ctx.identity):
            refused = (
                "this console is read-only"
                if self.settings.console_read_only
                else f"{ctx.identity.name} has the viewer right: decisions are for operators"
            )
        if refused is not None:
            self.audit_refusal(ctx, refused)
            return self.page(ctx, "Refused", message("refused", f"Refused: {refused}"), status=403)
        assert ctx.identity is not None
        form = ctx.form
        key = form.get("key") or ""
        try:
            seen = decisions.Seen(
                form.get("seen_state") or "",
                form.get("seen_updated_at") or "",
                int(form.get("seen_attempts") or ""),
            )
        except ValueError:
            self.audit_refusal(ctx, "the form does not say what the page showed")
            return self.page(
                ctx,
                "Refused",
                message("refused", "Refused: the form does not say what the page showed."),
                status=400,
            )
        with self.pool.connection() as conn:
            result = decisions.apply(
                conn,
                self.settings,
                ctx.identity,
                ctx.client,
                key,
                form.get("action") or "",
                seen,
                form.get("reason") or "",
            )
        status = 200 if result.applied else 409
        return self.page(
            ctx,
            "Decision" if result.applied else "Refused",
            pages.outcome(result.applied, result.message, key),
            status=status,
        )

    # -- bulk decisions over a list's filter -------------------------------------------------

    def bulk_actions(self, f: queries.Filters) -> list[str]:
        """The bulk decisions valid for effects in the filter's state (of its type, if any)."""
        if f.state is None:
            return []
        types = [f.effect_type] if f.effect_type else self.types
        found: set[str] = set()
        for t in types or ["?"]:
            found.update(
                decisions.actions(self.settings, {"state": f.state, "effect_type": t}, None)
            )
        return [a for a in decisions.BULK_ACTIONS if a in found]

    def not_allowed(self, ctx: Context) -> Response:
        return self.page(
            ctx,
            "Not allowed",
            message(
                "refused",
                "Decisions need the operator right and a console that is not read-only.",
            ),
            status=403,
        )

    def bulk_form(self, ctx: Context) -> Response:
        assert ctx.identity is not None
        if not self.guard.may_decide(ctx.identity):
            return self.not_allowed(ctx)
        f = self.filters(ctx)
        action = ctx.param("action") or ""
        if action not in decisions.BULK_ACTIONS:
            raise BadRequest(f"{action!r} is not a decision taken in bulk")
        if f.state is None:
            raise BadRequest("a bulk decision needs a state in the filter")
        f = replace(f, after=0)
        cap = self.settings.console_bulk_cap
        with self.pool.connection() as conn:
            rows, more = queries.page(conn, "console_effects", f, cap)
        valid = [action in decisions.actions(self.settings, r, None) for r in rows]
        chosen = [
            [r["operation_key"], r["state"], r["updated_at"].isoformat(), r["attempts"]]
            for r, ok in zip(rows, valid, strict=True)
            if ok
        ]
        body = pages.bulk_preview(
            self.settings, rows, more is not None, f, action, valid, json.dumps(chosen), ctx.csrf
        )
        return self.page(ctx, "Decide in bulk", body)

    def bulk(self, ctx: Context) -> Response:
        form = ctx.form
        action = form.get("action") or ""
        refused = self.check_post(ctx)
        if refused is None and ctx.identity is not None and not self.guard.may_decide(ctx.identity):
            refused = (
                "this console is read-only"
                if self.settings.console_read_only
                else f"{ctx.identity.name} has the viewer right: decisions are for operators"
            )
        chosen: list[Any] = []
        if refused is None:
            try:
                chosen = json.loads(form.get("effects") or "")
                seen = [
                    (str(key), decisions.Seen(str(state), str(at), int(attempts)))
                    for key, state, at, attempts in chosen
                ]
            except (ValueError, TypeError):
                refused = "the form does not say what the page showed"
            else:
                if action not in decisions.BULK_ACTIONS:
                    refused = f"{action!r} is not a decision taken in bulk"
                elif len(seen) > self.settings.console_bulk_cap:
                    refused = (
                        f"{len(seen)} effects: more than the cap of "
                        f"{self.settings.console_bulk_cap}"
                    )
        if refused is not None:
            self.audit_refusal(ctx, refused, action=f"bulk {action}".strip())
            return self.page(ctx, "Refused", message("refused", f"Refused: {refused}"), status=403)
        assert ctx.identity is not None
        reason = form.get("reason") or ""
        tag = f"bulk {action} of {len(seen)}"
        results: list[tuple[str, bool, str]] = []
        with self.pool.connection() as conn:
            for key, what in seen:
                outcome = decisions.apply(
                    conn,
                    self.settings,
                    ctx.identity,
                    ctx.client,
                    key,
                    action,
                    what,
                    reason,
                    bulk=tag,
                )
                results.append((key, outcome.applied, outcome.message))
        back = form.get("filter") or ""
        if not back.startswith("/effects"):
            back = "/effects"
        return self.page(ctx, "Bulk decision", pages.bulk_outcome(results, back))

    def audit(self, ctx: Context) -> Response:
        before = ctx.param("before")
        if before is not None and not before.isdigit():
            raise BadRequest("before must be an audit id")
        key = ctx.param("key")
        with self.reader(ctx).connection() as conn:
            rows, more = queries.audit_page(
                conn, key, int(before) if before else None, self.settings.console_page_size
            )
        return self.page(ctx, "Audit", pages.audit(rows, key, more), here="audit")

    # -- signing in ----------------------------------------------------------------------------

    def login_form(self, ctx: Context) -> Response:
        if self.guard.mode != "login":
            return RedirectResponse("/", status_code=303)
        if ctx.identity is not None:
            return RedirectResponse("/", status_code=303)
        return self.page(ctx, "Sign in", pages.login(None, ctx.csrf))

    def login(self, ctx: Context) -> Response:
        if self.guard.mode != "login":
            return self.page(
                ctx, "Sign in", message("refused", "The proxy signs people in."), status=404
            )
        refused = self.check_post(ctx)
        if refused is not None:
            return self.page(ctx, "Sign in", pages.login(refused, ctx.csrf), status=403)
        client = ctx.client or "?"
        now = time.monotonic()
        failures = self.failures.setdefault(client, deque())
        while failures and failures[0] < now - FAILURE_WINDOW_S:
            failures.popleft()
        if len(failures) >= MAX_FAILURES:
            return self.page(
                ctx,
                "Sign in",
                pages.login("Too many failed sign-ins from this address; wait a while.", ctx.csrf),
                status=429,
            )
        user = self.guard.sign_in(ctx.form.get("name", ""), ctx.form.get("password", ""))
        if user is None:
            failures.append(now)
            if len(self.failures) > 10_000:
                self.failures.clear()
            log.warning("console: failed sign-in from %s", client)
            return self.page(
                ctx, "Sign in", pages.login("Wrong name or password.", ctx.csrf), status=401
            )
        failures.clear()
        log.info("console: %s signed in from %s", user.name, client)
        response = RedirectResponse("/", status_code=303)
        # A fresh session (and nonce) at every sign-in: a cookie planted before it is worthless.
        self.set_cookie(ctx.request, response, self.guard.make_session(user.name))
        return response

    def logout(self, ctx: Context) -> Response:
        refused = self.check_post(ctx)
        if refused is not None:
            return self.page(ctx, "Refused", message("refused", refused), status=403)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        response.delete_cookie(SECURE_COOKIE, path="/", secure=True)
        return response


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form, bounded in size; the last value of a repeated field."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadRequest("form too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("the form cannot be read") from exc
    return {k: v[-1] for k, v in fields.items()}


def build_app(
    settings: Settings,
    guard: Guard,
    pool: ConnectionPool[Any],
    viewer_pool: ConnectionPool[Any] | None = None,
) -> Starlette:
    console = Console(settings, guard, pool, viewer_pool)

    def route(path: str, handler: Callable[[Context], Response], method: str = "GET") -> Route:
        post = method == "POST"

        async def endpoint(request: Request) -> Response:
            try:
                form = await _form(request) if post else {}
            except BadRequest as exc:
                return PlainTextResponse(f"bad request: {exc}", status_code=400)
            return await run_in_threadpool(console.handle, request, form, handler, post=post)

        return Route(path, endpoint, methods=[method])

    async def css(request: Request) -> Response:
        return Response(STYLE, media_type="text/css")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [
        Route("/static/console.css", css),
        Route("/healthz", healthz),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        route("/", console.overview),
        route("/effects", console.effects),
        route("/groups", console.groups),
        route("/effect", console.effect),
        route("/decide", console.decide_form),
        route("/decide", console.decide, "POST"),
        route("/bulk", console.bulk_form),
        route("/bulk", console.bulk, "POST"),
        route("/audit", console.audit),
        route("/login", console.login_form),
        route("/login", console.login, "POST"),
        route("/logout", console.logout, "POST"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SecurityHeaders)
    return app


def open_pool(
    settings: Settings, url: str | None = None, name: str = "relay-console"
) -> ConnectionPool[Any]:
    """A small pool of autocommit connections (``database_url``'s unless ``url``) named
    ``name``; each statement bounded."""

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET jit = off")
        conn.execute("SET statement_timeout = '15s'")

    return ConnectionPool(
        url or settings.require_database_url(),
        min_size=1,
        max_size=4,
        timeout=10.0,
        open=True,
        configure=configure,
        kwargs={
            "autocommit": True,
            "application_name": name,
            "connect_timeout": 10,
            # Generic plans of the lists' optional filters would scan: plan every query.
            "prepare_threshold": None,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        },
        name=name,
    )
