"""What every handler of the console works with, kept on the application, and rendering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from aiohttp import web

from tracker.console.auth import Authenticator, Identity
from tracker.console.csrf import FIELD as CSRF_FIELD
from tracker.console.csrf import CsrfTokens
from tracker.console.queries import ConsoleQueries


@dataclass(frozen=True)
class Console:
    queries: ConsoleQueries
    templates: jinja2.Environment
    auth: Authenticator
    csrf: CsrfTokens
    allow_actions: bool


CONSOLE = web.AppKey("console", Console)


def console_of(request: web.Request) -> Console:
    return request.app[CONSOLE]


def identity_of(request: web.Request) -> Identity | None:
    """Who sent `request` (None on the public pages), asked again rather than stored on
    the request: a dictionary look-up and an HMAC cost less than a request-scoped key."""
    return console_of(request).auth.identify(request)


def render(
    request: web.Request, template: str, *, status: int = 200, **values: Any
) -> web.Response:
    """`template` as an HTML answer; every value is escaped by the template engine."""
    console = console_of(request)
    identity = identity_of(request)
    page = console.templates.get_template(template).render(
        identity=identity,
        csrf_field=CSRF_FIELD,
        csrf_token=console.csrf.for_identity(identity.name) if identity else "",
        allow_actions=console.allow_actions,
        **values,
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")
