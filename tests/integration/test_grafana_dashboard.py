"""The Grafana dashboard in deploy/grafana: every metric it queries is one /metrics exports.

What is exported comes from a real scrape. The daemon's own pieces do real work and update
one Metrics: a Daemon tick sweeps a real database with Deepvue and the file host faked at the
httpx seam, the daemon's gauge refresh reads the database and the budget, and the webhook
listener takes deliveries over loopback. The real endpoint serves it, and the exposition is
parsed the way Prometheus parses it.

What the dashboard queries comes from a small PromQL tokenizer run over every panel's
expressions and every variable's query: each metric name, with the labels its selector
matches on, and the labels the expression groups by.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_deepvue import FakeDeepvue, completed, open_clients
from tracker.budget import MemoryBudget, Throttle
from tracker.clock import DatabaseClock
from tracker.daemon import Daemon
from tracker.domain.model import PollPolicy
from tracker.domain.quota import plan_windows
from tracker.http_listener import start_listener
from tracker.metrics import Metrics, start_metrics_server
from tracker.store import Store
from tracker.sweep import Sweeper
from tracker.webhook import webhook_app

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tracker-dashboard.json"
WEBHOOK_SECRET = "dashboard-hook-secret"
OWNER = "dashboard-test"
# Prometheus's own series about each scrape, not exported by the tracker.
PROMETHEUS_SERIES = {"up": frozenset[str]()}
# Labels Prometheus attaches to every series it scrapes.
TARGET_LABELS = frozenset({"job", "instance"})

# PromQL words that are not metric names when no "(" follows them.
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
# Aggregations may be followed by `by (...)` rather than "(": `max by (state) (x)`.
AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
BRACKETS = {")": "(", "]": "[", "}": "{"}
# Words whose parenthesised list holds label names.
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
    |(?P<number>\d[\w.]*|\.\d\w*)
    |(?P<identifier>[A-Za-z_:][\w:]*)
    |(?P<punctuation>[(){}\[\],])
    |(?P<operator>=~|!~|!=|==|<=|>=|[-+*/%^=<>@:])
    |(?P<space>\s+)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Selector:
    """A metric named in an expression, with the labels its matchers test."""

    metric: str
    labels: frozenset[str]


@dataclass(frozen=True)
class Query:
    """What one expression asks of the exposition."""

    selectors: tuple[Selector, ...]
    grouping: frozenset[str]


def _tokens(expression: str) -> list[tuple[str, str]]:
    """(kind, text) pairs without whitespace; an unknown character is an error, not a skip."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expression):
        match = TOKEN.match(expression, position)
        if match is None:
            raise ValueError(f"cannot read {expression[position:]!r} in {expression!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    open_brackets: list[str] = []
    for _, text in tokens:
        if text in BRACKETS.values():
            open_brackets.append(text)
        elif text in BRACKETS and (not open_brackets or open_brackets.pop() != BRACKETS[text]):
            raise ValueError(f"unbalanced {text!r} in {expression!r}")
    if open_brackets:
        raise ValueError(f"unclosed {open_brackets[-1]!r} in {expression!r}")
    return tokens


def _closing(tokens: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    """The index of the token closing the bracket opened at `start`."""
    depth = 0
    for index in range(start, len(tokens)):
        text = tokens[index][1]
        if text == opening:
            depth += 1
        elif text == closing:
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced {opening!r} in {' '.join(t for _, t in tokens)!r}")


def parse_query(expression: str) -> Query:
    """The metrics `expression` selects, and the labels it groups or matches on.

    An identifier names a metric unless a "(" follows it (a function or an aggregation), it
    is a PromQL keyword, or it sits in a label matcher, a grouping list (`by (...)`,
    `on (...)`, ...) or a range (`[5m]`). Numbers, durations, strings and dashboard
    variables are never names.
    """
    tokens = _tokens(expression)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text == "[":
            index = _closing(tokens, index, "[", "]") + 1
        elif text == "{":
            # A bare selector ({__name__=...}) names no metric this check could see.
            raise ValueError(f"a selector without a metric name in {expression!r}")
        elif kind == "identifier" and text.lower() in GROUPING:
            if following == "(":
                end = _closing(tokens, index + 1, "(", ")")
                grouping.update(t for k, t in tokens[index + 2 : end] if k == "identifier")
                index = end + 1
            else:
                index += 1  # group_left without a list
        elif (
            kind == "identifier"
            and following != "("
            and text.lower() not in KEYWORDS | AGGREGATIONS
        ):
            labels: set[str] = set()
            index += 1
            if following == "{":
                end = _closing(tokens, index, "{", "}")
                matchers = tokens[index + 1 : end]
                labels = {
                    name
                    for (kind_, name), (_, operator) in pairwise(matchers)
                    if kind_ == "identifier" and operator in {"=", "!=", "=~", "!~"}
                }
                index = end + 1
            selectors.append(Selector(text, frozenset(labels)))
        else:
            index += 1
    return Query(tuple(selectors), frozenset(grouping))


LABEL_VALUES = re.compile(
    r"\s*label_values\(\s*(?:(?P<selector>.*),\s*)?(?P<label>\w+)\s*\)\s*", re.DOTALL
)


def parse_variable_query(text: str) -> Query:
    """A Grafana Prometheus variable query: label_values([selector, ]label) or an expression.

    With a selector, the label must be one of its metric's; without one, Prometheus looks
    across every series, which this check cannot judge.
    """
    match = LABEL_VALUES.fullmatch(text)
    if match is None:
        return parse_query(text)
    if match["selector"] is None:
        return Query((), frozenset())
    query = parse_query(match["selector"])
    return Query(query.selectors, query.grouping | {match["label"]})


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, Query]]:
    """(where, expression, query) for every panel target and every query variable."""
    found: list[tuple[str, str, Query]] = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expression = target["expr"]
            found.append((f"panel {panel['title']!r}", expression, parse_query(expression)))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            found.append((f"variable ${variable['name']}", text, parse_variable_query(text)))
    return found


Exported = dict[str, frozenset[str]]


def problems(dashboard: dict[str, Any], exported: Exported) -> list[str]:
    """What the dashboard asks for that the exposition does not have, one line each."""
    known = exported | PROMETHEUS_SERIES
    found: list[str] = []
    for where, expression, query in dashboard_queries(dashboard):
        available = set(TARGET_LABELS)
        for selector in query.selectors:
            if selector.metric not in known:
                found.append(f"{where}: no metric {selector.metric!r} in {expression!r}")
                continue
            labels = known[selector.metric] | TARGET_LABELS
            available |= labels
            for label in sorted(selector.labels - labels):
                found.append(f"{where}: {selector.metric!r} has no label {label!r}")
        for label in sorted(query.grouping - available):
            found.append(f"{where}: no metric in {expression!r} has a label {label!r}")
    return found


def _load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _exported(exposition: str) -> Exported:
    """Sample name -> the label names it carries, as Prometheus would store them."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(names) for name, names in labels.items()}


async def _scrape_after_real_work(engine: sa.Engine, output_dir: Path) -> str:
    """Sweep, refresh the gauges and take webhook deliveries as the daemon does; then scrape."""
    store = Store(engine)
    store.enqueue_many(["done-1", "done-refused", "invalid-1", "open-1"])
    fake = FakeDeepvue()
    # A file on a host the downloader may not fetch from: a download problem, counted.
    fake.script("done-refused", completed("done-refused", "https://elsewhere.test/x.csv"))
    metrics = Metrics()
    throttle = Throttle(MemoryBudget(plan_windows(10, 600, 10000)))
    stopping = asyncio.Event()
    clock = DatabaseClock(store.register_instance(OWNER, socket.gethostname(), os.getpid(), None))
    async with open_clients(fake, throttle, output_dir) as (client, downloader):
        sweeper = Sweeper(
            store=store,
            client=client,
            throttle=throttle,
            downloader=downloader,
            policy=PollPolicy(min_interval=3600, max_interval=3600, max_age=86400),
            owner=OWNER,
            stopping=stopping,
            concurrency=4,
            lease_seconds=60,
            shutdown_grace=5,
            metrics=metrics,
        )
        daemon = Daemon(
            sweeper,
            store=store,
            throttle=throttle,
            owner=OWNER,
            stopping=stopping,
            max_age=86400,
            shutdown_grace=5,
            sweep_interval=5,
            clock=clock,
            metrics=metrics,
        )
        await daemon.tick()
        await daemon.refresh_gauges()

    async def bring_forward(request_ids: set[str]) -> set[str]:
        return await asyncio.to_thread(store.bring_forward, request_ids, clock.now(), 30.0)

    hooks = webhook_app(
        WEBHOOK_SECRET,
        bring_forward=bring_forward,
        max_body=4096,
        on_outcome=metrics.observe_webhook,
    )
    webhook_server = await start_listener(hooks, "127.0.0.1", 0, event="webhook.listening")
    metrics_server = await start_metrics_server("127.0.0.1:0", metrics, _healthy)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            hook_port = webhook_server.addresses[0][1]
            delivery = await http.post(
                f"http://127.0.0.1:{hook_port}/webhook/{WEBHOOK_SECRET}",
                json={"request_id": "open-1"},
            )
            assert delivery.status_code == 200
            metrics_port = metrics_server.addresses[0][1]
            scrape = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert scrape.status_code == 200
            return scrape.text
    finally:
        await metrics_server.cleanup()
        await webhook_server.cleanup()


async def _healthy() -> str | None:
    return None


@pytest.fixture
def exported(engine: sa.Engine, tmp_path: Path) -> Exported:
    return _exported(asyncio.run(_scrape_after_real_work(engine, tmp_path / "out")))


def test_every_metric_the_dashboard_queries_is_exported(exported: Exported) -> None:
    dashboard = _load_dashboard()
    assert problems(dashboard, exported) == []
    # The check saw real work, not an empty exposition: every family has samples.
    assert exported["tracker_download_bytes_total"] == frozenset()
    assert exported["tracker_download_problems_total"] == {"problem"}
    assert exported["tracker_webhook_deliveries_total"] == {"outcome"}
    assert exported["tracker_quota_left"] == {"window"}
    assert exported["tracker_status_calls_total"] == {"outcome"}


def test_every_exported_family_has_a_panel(exported: Exported) -> None:
    queried = {
        selector.metric
        for _, _, query in dashboard_queries(_load_dashboard())
        for selector in query.selectors
    }
    # A family is on the dashboard when any of its samples is (a histogram by _bucket...).
    # prometheus_client's _created samples are bookkeeping, not something to chart.
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in exported}
    charted = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in queried}
    assert sorted(families - charted) == []


def test_a_panel_naming_a_missing_metric_or_label_is_caught(exported: Exported) -> None:
    dashboard = _load_dashboard()
    broken = copy.deepcopy(dashboard)
    panels = [panel for panel in _panels(broken["panels"]) if panel.get("targets")]
    # Each mistake a dashboard author makes: a counter without _total, a histogram without
    # _bucket, a label that is not there, a grouping by a label the metric lacks.
    panels[0]["targets"][0]["expr"] = 'sum(rate(tracker_status_calls{outcome="ready"}[5m]))'
    panels[1]["targets"][0]["expr"] = "histogram_quantile(0.9, rate(tracker_download_seconds[5m]))"
    panels[2]["targets"][0]["expr"] = 'tracker_quota_left{windows="day"}'
    panels[3]["targets"][0]["expr"] = "sum by (state) (tracker_quota_left)"
    assert problems(broken, exported) == [
        f"panel {panels[0]['title']!r}: no metric 'tracker_status_calls' in "
        "'sum(rate(tracker_status_calls{outcome=\"ready\"}[5m]))'",
        f"panel {panels[1]['title']!r}: no metric 'tracker_download_seconds' in "
        "'histogram_quantile(0.9, rate(tracker_download_seconds[5m]))'",
        f"panel {panels[2]['title']!r}: 'tracker_quota_left' has no label 'windows'",
        f"panel {panels[3]['title']!r}: no metric in "
        "'sum by (state) (tracker_quota_left)' has a label 'state'",
    ]
    variable = next(v for v in broken["templating"]["list"] if v["name"] == "instance")
    variable["query"]["query"] = "label_values(tracker_last_sweep, instance)"
    assert problems(broken, exported)[-1] == (
        "variable $instance: no metric 'tracker_last_sweep' in "
        "'label_values(tracker_last_sweep, instance)'"
    )


def test_the_dashboard_uses_the_datasource_and_instance_variables() -> None:
    dashboard = _load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["instance"]["multi"] is True
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("expression", "metrics", "grouping"),
    [
        ("up", {"up": set()}, set()),
        ('up{job="tracker", instance=~"a|b"}', {"up": {"job", "instance"}}, set()),
        (
            'max by (state) (tracker_batches{job="$job"})',
            {"tracker_batches": {"job"}},
            {"state"},
        ),
        (
            "histogram_quantile(0.95, sum by (le) (rate(x_bucket{a='by'}[$__rate_interval])))",
            {"x_bucket": {"a"}},
            {"le"},
        ),
        ("a / on (window) group_left (extra) b", {"a": set(), "b": set()}, {"window", "extra"}),
        ("a * ignoring(instance) group_right b", {"a": set(), "b": set()}, {"instance"}),
        ("sum without (instance) (a) or vector(0)", {"a": set()}, {"instance"}),
        ("time() - a offset 5m", {"a": set()}, set()),
        ("rate(a[5m:30s]) > bool 1e3", {"a": set()}, set()),
        ("a and b unless c", {"a": set(), "b": set(), "c": set()}, set()),
        ('sum(a{b!~"x{y}"}) by (b) @ end()', {"a": {"b"}}, {"b"}),
        ("sum(rate(a[${interval}])) * 60 + .5 - 0x1F", {"a": set()}, set()),
        ('count(a{job="[[job]]"}) == Inf', {"a": {"job"}}, set()),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a": set()}, set()),
    ],
)
def test_parse_query(expression: str, metrics: dict[str, set[str]], grouping: set[str]) -> None:
    query = parse_query(expression)
    assert {s.metric: set(s.labels) for s in query.selectors} == metrics
    assert query.grouping == grouping


def test_parse_variable_query() -> None:
    query = parse_variable_query('label_values(a{job="$job"}, instance)')
    assert [s.metric for s in query.selectors] == ["a"]
    assert query.grouping == {"instance"}
    assert parse_variable_query("label_values(job)").selectors == ()


@pytest.mark.parametrize("expression", ['{__name__="a"}', "sum(a", "a ; b", "rate(a[5m)"])
def test_parse_query_refuses_what_it_cannot_read(expression: str) -> None:
    with pytest.raises(ValueError):
        parse_query(expression)
