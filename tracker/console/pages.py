"""The console's pages and form handlers: overview, list, one batch, login, actions.

Reads and writes go through ConsoleQueries in a thread (the store blocks). What a page
shows of the database is escaped by the templates (autoescape) and passed through the
`shown` filter (tracker.console.app) first, which removes secrets and query strings.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote, urlencode

import structlog
from aiohttp import web

from tracker.console.auth import SESSION_COOKIE, local_path
from tracker.console.chart import HEIGHT as CHART_HEIGHT
from tracker.console.chart import WIDTH as CHART_WIDTH
from tracker.console.chart import hour_bars
from tracker.console.context import console_of, identity_of, render
from tracker.console.cursor import BadCursor, decode_cursor
from tracker.console.queries import AGE_BUCKETS, PAGE_SIZE, ListFilters
from tracker.domain.states import State
from tracker.store import OperatorResult

# Seconds between the overview's reloads of itself.
OVERVIEW_REFRESH = 10
# A wrong token at the login form costs the sender this long: no quick guessing.
LOGIN_FAILURE_DELAY = 0.5
# Longest filter values accepted: a request id is at most 128 characters.
MAX_FILTER_LENGTH = 200

# What an action's redirect may say, by code: the page never echoes text from the URL.
ACTION_MESSAGES = {
    "retried": "Retried: the batch is pending again and will be checked shortly.",
    "cancelled": "Cancelled.",
    "not-retryable": "Not retried: only a finished batch can be retried.",
    "not-cancellable": "Not cancelled: only an unfinished batch can be cancelled.",
    "not-found": "That batch is not tracked.",
}

_log = structlog.get_logger("tracker.console")


async def overview(request: web.Request) -> web.Response:
    data = await asyncio.to_thread(console_of(request).queries.overview)
    return render(
        request,
        "overview.html",
        title="Overview",
        data=data,
        bars=hour_bars(data.hourly_calls),
        chart_width=CHART_WIDTH,
        chart_height=CHART_HEIGHT,
        age_buckets=[label for label, _ in AGE_BUCKETS],
        refresh=OVERVIEW_REFRESH,
    )


async def batches(request: web.Request) -> web.Response:
    query = request.query
    state = query.get("state") or None
    label = query.get("label") or None
    prefix = query.get("q") or None
    problem = None
    if state is not None and state not in {s.value for s in State}:
        problem = "There is no such state."
    elif any(len(value or "") > MAX_FILTER_LENGTH for value in (label, prefix)):
        problem = f"A filter is longer than {MAX_FILTER_LENGTH} characters."
    before_id = None
    if problem is None and query.get("cursor"):
        try:
            before_id = decode_cursor(query["cursor"])
        except BadCursor:
            problem = "The page cursor is not one this console made. Start from the first page."
    if problem is not None:
        return render(request, "error.html", status=400, title="Bad request", message=problem)
    filters = ListFilters(state=state, label=label, request_id_prefix=prefix)
    page = await asyncio.to_thread(console_of(request).queries.batch_list, filters, before_id)
    kept = {
        key: value for key, value in (("state", state), ("label", label), ("q", prefix)) if value
    }
    return render(
        request,
        "batches.html",
        title="Batches",
        page=page,
        filters=filters,
        states=[s.value for s in State],
        page_size=PAGE_SIZE,
        first_page="/batches" + ("?" + urlencode(kept) if kept else ""),
        next_page=None
        if page.next_cursor is None
        else "/batches?" + urlencode(kept | {"cursor": page.next_cursor}),
        deeper=before_id is not None,
    )


async def batch(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    detail = await asyncio.to_thread(console_of(request).queries.batch, request_id)
    if detail is None:
        return render(
            request,
            "error.html",
            status=404,
            title="Not found",
            message="No batch with that request_id is tracked.",
        )
    return render(
        request,
        "batch.html",
        title=f"Batch {request_id}",
        detail=detail,
        message=ACTION_MESSAGES.get(request.query.get("done", "")),
    )


async def retry(request: web.Request) -> web.StreamResponse:
    return await _operator_action(request, "retry")


async def cancel(request: web.Request) -> web.StreamResponse:
    return await _operator_action(request, "cancel")


async def _operator_action(request: web.Request, verb: str) -> web.StreamResponse:
    console = console_of(request)
    if not console.allow_actions:
        return render(
            request,
            "error.html",
            status=403,
            title="Read-only",
            message="This console is read-only: start it with --allow-actions to retry or cancel.",
        )
    request_id = request.match_info["request_id"]
    move = console.queries.retry if verb == "retry" else console.queries.cancel
    result, state = await asyncio.to_thread(move, request_id)
    if result is OperatorResult.DONE:
        code = "retried" if verb == "retry" else "cancelled"
    elif result is OperatorResult.NOT_FOUND:
        code = "not-found"
    else:
        code = "not-retryable" if verb == "retry" else "not-cancellable"
    _log.info(
        "console.action", action=verb, request_id=request_id, outcome=result.value, state=state
    )
    raise web.HTTPSeeOther(f"/batches/{quote(request_id, safe='')}?done={code}")


async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", title="Log in", next=local_path(request.query.get("next")))


async def login(request: web.Request) -> web.StreamResponse:
    console = console_of(request)
    form = await request.post()
    given = form.get("token")
    next_path = local_path(str(form.get("next") or "/"))
    if not isinstance(given, str) or not console.auth.token_matches(given.strip()):
        _log.warning("console.login", outcome="refused", remote=request.remote)
        await asyncio.sleep(LOGIN_FAILURE_DELAY)
        return render(
            request,
            "login.html",
            status=401,
            title="Log in",
            next=next_path,
            error="That token is not the console's.",
        )
    session_id = console.auth.open_session()
    _log.info("console.login", outcome="ok", remote=request.remote)
    response = web.HTTPSeeOther(next_path)
    # HttpOnly: no script reads it; Strict: no other site's link or form sends it. Secure
    # only when this server itself speaks https: behind a TLS proxy, the proxy adds it.
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="Strict",
        path="/",
        max_age=int(console.auth.session_lifetime),
        secure=request.secure,
    )
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    identity = identity_of(request)
    if identity is not None and identity.session_id is not None:
        console_of(request).auth.close_session(identity.session_id)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response
