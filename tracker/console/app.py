"""The console's aiohttp application: routes, templates, and the middlewares that guard it.

Middlewares, outermost first:
- security headers on every answer, errors and static files included (CSP without any
  inline script or style, no sniffing, no referrer, pages never cached);
- error pages: a 4xx raised anywhere is shown as a page, not aiohttp's plain text;
- authentication: the bearer token or a session cookie, else the login page or a 401;
- CSRF: every POST but the login form carries the session's token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from urllib.parse import quote

import jinja2
import sqlalchemy as sa
import structlog
from aiohttp import web

from tracker.console import pages
from tracker.console.auth import Authenticator, local_path, wants_login_page
from tracker.console.context import CONSOLE, Console, identity_of, render
from tracker.console.csrf import FIELD as CSRF_FIELD
from tracker.console.csrf import CsrfTokens
from tracker.console.queries import ConsoleQueries
from tracker.console.sessions import Sessions
from tracker.db import describe_db_error
from tracker.domain.redact import redact
from tracker.views.text import printable, when_utc

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Paths anyone may fetch: the login form and the stylesheet it uses.
PUBLIC_PATHS = frozenset({"/login"})
STATIC_PREFIX = "/static/"
# Forms are a token or two buttons: nothing legitimate comes near this.
MAX_REQUEST_BODY = 64 * 1024

_HERE = Path(__file__).resolve().parent


def console_app(
    queries: ConsoleQueries,
    *,
    token: str,
    allow_actions: bool,
    sessions: Sessions | None = None,
    csrf: CsrfTokens | None = None,
) -> web.Application:
    """The console over `queries`, opened by `token`; retry and cancel only with
    `allow_actions`."""
    console = Console(
        queries=queries,
        templates=console_templates(),
        auth=Authenticator(token, sessions or Sessions()),
        csrf=csrf or CsrfTokens(),
        allow_actions=allow_actions,
    )
    app = web.Application(
        middlewares=[_security_headers, _error_pages, _authenticate, _check_csrf],
        client_max_size=MAX_REQUEST_BODY,
    )
    app[CONSOLE] = console
    app.router.add_get("/", pages.overview)
    app.router.add_get("/login", pages.login_form)
    app.router.add_post("/login", pages.login)
    app.router.add_post("/logout", pages.logout)
    app.router.add_get("/batches", pages.batches)
    # Any request id, even a malformed one with a slash, reaches its page (links quote it).
    app.router.add_post("/batches/{request_id:.+}/retry", pages.retry)
    app.router.add_post("/batches/{request_id:.+}/cancel", pages.cancel)
    app.router.add_get("/batches/{request_id:.+}", pages.batch)
    app.router.add_static("/static", _HERE / "static")
    return app


def console_templates() -> jinja2.Environment:
    """The page templates with the filters they use, every value autoescaped. They are
    package data: CI's wheel smoke test compiles them from the installed wheel."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("tracker.console", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["shown"] = _shown
    environment.filters["when"] = when_utc
    environment.filters["segment"] = lambda value: quote(str(value), safe="")
    environment.filters["size"] = _size
    return environment


def _shown(value: object) -> str:
    """A value from the database for people: no secret or query string, no control
    character (the template escapes what is left)."""
    if value is None:
        return "-"
    return printable(redact(str(value)))


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size, unit = float(value), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{value} bytes" if unit == "bytes" else f"{value} bytes ({size:.1f} {unit})"


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as error:
        _secure(error.headers, request.path)
        raise
    _secure(response.headers, request.path)
    return response


def _secure(headers: MutableMapping[str, str], path: str) -> None:
    headers.update(SECURITY_HEADERS)
    if not path.startswith(STATIC_PREFIX):
        # Pages hold KYC metadata: no browser or proxy cache keeps them.
        headers["Cache-Control"] = "no-store"


@web.middleware
async def _error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except sa.exc.DBAPIError as error:
        # Unreachable (503: try again), or refused this statement (a role without the
        # rights to retry, say): the driver's first line says which, without SQL.
        reason = describe_db_error(error)
        structlog.get_logger("tracker.console").error(
            "console.database_error", path=request.path, error=reason
        )
        unreachable = isinstance(error, sa.exc.OperationalError)
        return render(
            request,
            "error.html",
            status=503 if unreachable else 500,
            title="Database error",
            message=f"The database could not be read: {reason}"
            if unreachable
            else f"The database refused: {reason}",
        )
    except web.HTTPException as error:
        if error.status < 400 or error.status == 401:
            raise
        return render(
            request,
            "error.html",
            status=error.status,
            title=error.reason,
            message=_ERROR_MESSAGES.get(error.status, "The console could not answer that."),
        )


_ERROR_MESSAGES = {
    404: "There is no such page.",
    405: "That page does not take this kind of request.",
    413: "That request is too large.",
}


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path.startswith(STATIC_PREFIX):
        return await handler(request)
    if identity_of(request) is None:
        if wants_login_page(request):
            target = local_path(request.path_qs)
            raise web.HTTPSeeOther("/login" + ("" if target == "/" else "?next=" + quote(target)))
        raise web.HTTPUnauthorized(
            headers={"WWW-Authenticate": 'Bearer realm="tracker console"'},
            text="401: a bearer token or a console session is required\n",
        )
    return await handler(request)


@web.middleware
async def _check_csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method != "POST" or request.path in PUBLIC_PATHS:
        return await handler(request)
    identity = identity_of(request)
    form = await request.post()
    given = form.get(CSRF_FIELD)
    if identity is None or not request.app[CONSOLE].csrf.matches(
        identity.name, given if isinstance(given, str) else None
    ):
        return render(
            request,
            "error.html",
            status=403,
            title="Forbidden",
            message="The form's CSRF token is missing or stale: reload the page and try again.",
        )
    return await handler(request)
