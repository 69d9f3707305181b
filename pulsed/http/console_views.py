"""The console's filters (a job filter from a query string or a JSON body)
and its server-rendered views (the job table, the cluster table, the
filter form, the chart series), apart from its routes (console.py)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from pulsed.config import parse_duration
from pulsed.config_model import MAX_DURATION_S
from pulsed.db import browse
from pulsed.db.browse import JobFilter
from pulsed.http.messages import (MAX_ID, invalid, json_type, parse_job_id,
                                  parse_timestamp)
from pulsed.jobs import JobState

NODE_SILENT_S = 30.0  # a node whose registry heartbeat is older is shown as stopped
NAME_LIMIT = 255
FILTER_FIELDS = ("id", "state", "type", "queue", "older_than", "error")


# -- filters ------------------------------------------------------------------------

def filter_from_query(query: Mapping[str, str]) -> JobFilter:
    """The browser's filter from ?state=&type=&queue=&since=&until=&error=&id=."""
    return JobFilter(
        id=parse_job_id(query["id"]) if "id" in query else None,
        state=_state(query.get("state")), type=_name("type", query.get("type")),
        queue=_name("queue", query.get("queue")),
        since=parse_timestamp("since", query["since"]) if "since" in query else None,
        until=parse_timestamp("until", query["until"]) if "until" in query else None,
        error=_name("error", query.get("error")))


def filter_from_body(data: Mapping[str, Any]) -> JobFilter:
    """A bulk action's filter from its JSON body."""
    unknown = sorted(set(data) - set(FILTER_FIELDS))
    if unknown:
        raise invalid(unknown[0], f"unknown field {unknown[0]!r}; a bulk action takes "
                                  f"{', '.join(FILTER_FIELDS)} and dry_run")
    for key in ("state", "type", "queue", "error"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise invalid(key, f"{key} must be a string, got {json_type(data[key])}")
    job_id = data.get("id")
    if job_id is not None and (not isinstance(job_id, int) or isinstance(job_id, bool)
                               or not 0 < job_id <= MAX_ID):
        raise invalid("id", f"id must be a positive integer, got {job_id!r}"[:120])
    return JobFilter(id=job_id, state=_state(data.get("state")),
                     type=_name("type", data.get("type")), queue=_name("queue", data.get("queue")),
                     older_than=_older_than(data.get("older_than")),
                     error=_name("error", data.get("error")))


def _cursor(query: Mapping[str, str]) -> browse.Cursor | None:
    text = query.get("after")
    if text is None:
        return None
    try:
        cursor = browse.Cursor.parse(text)
    except ValueError:
        cursor = None
    if cursor is None or not 0 < cursor.id <= MAX_ID:
        raise invalid("after", f"after must be the next_after of the page before, "
                               f"got {text[:60]!r}")
    return cursor


def _state(value: str | None) -> str | None:
    states = [s.value for s in JobState]
    if value is not None and value not in states:
        raise invalid("state", f"state must be one of {', '.join(states)}, got {value[:40]!r}")
    return value


def _name(field: str, value: str | None) -> str | None:
    if value is not None and (len(value) > NAME_LIMIT or "\x00" in value):
        raise invalid(field, f"{field} must be at most {NAME_LIMIT} characters, without NUL")
    return value


def _older_than(value: Any) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_DURATION_S:  # 1e12 s came back as "timestamp out of range"
        raise invalid("older_than", f"older_than must be seconds or a duration like '2h', "
                                    f"'7d', at most 100 years, got {value!r}"[:160])
    return seconds


# -- views -------------------------------------------------------------------------

def cluster_view(processes: list[dict[str, Any]], leader: Mapping[str, Any] | None,
                 local: tuple[str, dict[int, Mapping[str, Any]]] = ("", {})
                 ) -> list[dict[str, Any]]:
    """Processes grouped by node: each node with its master's and workers'
    state, whether it leads, its drain state, and whether it stopped
    heartbeating. RSS and restarts come from the registry's info, which
    each node's scheduler fills from its board every heartbeat; for this
    node's processes the master's status (`local`) is fresher and wins."""
    local_node, local_children = local
    leader_node = (leader["leader_id"].rsplit("/", 1)[0]
                   if leader and leader.get("live") else None)
    nodes: dict[str, dict[str, Any]] = {}
    for row in processes:
        node = nodes.setdefault(row["node_id"], {
            "node_id": row["node_id"], "leader": row["node_id"] == leader_node,
            "heartbeat_age_s": row["heartbeat_age_s"], "state": None, "processes": []})
        node["heartbeat_age_s"] = min(node["heartbeat_age_s"], row["heartbeat_age_s"])
        info = dict(row["info"]) if isinstance(row["info"], dict) else {}
        child = local_children.get(row["pid"]) if row["node_id"] == local_node else None
        if child is not None:
            info.update(restarts=child.get("restarts"), rss_bytes=child.get("rss_bytes"))
        if row["role"] == "master":
            node["state"] = info.get("state")
        rss = info.get("rss_bytes")
        node["processes"].append({
            "role": row["role"], "idx": row["idx"], "pid": row["pid"],
            "state": info.get("state"), "running": row.get("running"),
            "jobs_done": info.get("jobs_done"),
            "rss_mb": round(rss / 2**20, 1) if isinstance(rss, int) and rss else None,
            "restarts": info.get("restarts"),
            "heartbeat_age_s": round(row["heartbeat_age_s"], 1)})
    for node in nodes.values():
        node["alive"] = node["heartbeat_age_s"] < NODE_SILENT_S
        node["heartbeat_age_s"] = round(node["heartbeat_age_s"], 1)
    return list(nodes.values())


def series(rows: list[dict[str, Any]], window_s: float) -> dict[str, Any]:
    """The charts' series: per bucket totals (rates per second) and the
    waiting depth per queue/type."""
    totals, depth = [], {}
    width = 10.0
    for row in rows:
        t = row["bucket"].isoformat()
        if row["queue"] == "*" and row["type"] == "*":
            totals.append({"t": t, "completed": row["completed"] / width,
                           "failed": row["failed"] / width, "retried": row["retried"] / width,
                           "p50": row["pickup_p50_s"], "p95": row["pickup_p95_s"],
                           "waiting": row["waiting"]})
        else:
            depth.setdefault(f"{row['queue']}/{row['type']}", []).append(
                {"t": t, "waiting": row["waiting"]})
    return {"window_s": window_s, "bucket_s": width, "totals": totals, "depth": depth}


def _iso_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value.isoformat() if isinstance(value, datetime) else value
            for key, value in row.items()}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _jobs_table(rows: list[dict[str, Any]], count: int, exact: bool,
                query: Mapping[str, str], next_page: browse.Cursor | None) -> str:
    head = ("<tr><th class=num>id</th><th>state</th><th>type</th><th>queue</th>"
            "<th class=num>attempt</th><th>created</th><th>last error</th></tr>")
    body = "".join(
        f'<tr data-id="{r["id"]}"><td class=num><a href="#job-{r["id"]}">{r["id"]}</a></td>'
        f'<td class="state {_e(r["state"])}">{_e(r["state"])}</td><td>{_e(r["type"])}</td>'
        f'<td>{_e(r["queue"])}</td><td class=num>{_e(r["attempt"])}</td>'
        f'<td>{_e(_short_time(r["created_at"]))}</td>'
        f'<td class=error>{_e((r["last_error"] or "")[:200])}</td></tr>' for r in rows)
    more = ""
    if next_page is not None:
        link = urlencode({**query, "after": next_page.text()})
        more = f'<a id="next-page" href="/console?{_e(link)}">older jobs &rarr;</a>'
    total = f"{count}" if exact else f"{count}+"
    return (f'<p id="job-count"><b>{total}</b> matching jobs</p>'
            f'<table id="jobs"><thead>{head}</thead><tbody>{body}</tbody></table>{more}')


def _short_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else str(value)


def _cluster_table(nodes: list[dict[str, Any]]) -> str:
    rows = []
    for node in nodes:
        status = "alive" if node["alive"] else f"silent {node['heartbeat_age_s']:.0f}s"
        if node["alive"] and node["state"] not in (None, "running"):
            status += f", {node['state']}"
        lead = " (leader)" if node["leader"] else ""
        for p in node["processes"]:
            rows.append(f'<tr class="{"" if node["alive"] else "stale"}"><td>{_e(node["node_id"])}'
                        f'{lead}</td><td>{_e(status)}</td><td>{_e(p["role"])} {p["idx"]}</td>'
                        f'<td class=num>{p["pid"]}</td><td>{_e(p["state"])}</td>'
                        f'<td class=num>{_e(p["running"])}</td><td class=num>{_e(p["rss_mb"])}</td>'
                        f'<td class=num>{_e(p["restarts"])}</td></tr>')
    head = ("<tr><th>node</th><th>heartbeat</th><th>process</th><th class=num>pid</th>"
            "<th>state</th><th class=num>running</th><th class=num>RSS MB</th>"
            "<th class=num>restarts</th></tr>")
    return f'<table id="cluster"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _filter_form(query: Mapping[str, str]) -> str:
    options = "".join(f'<option value="{s.value}"{" selected" if query.get("state") == s.value else ""}>'
                      f"{s.value}</option>" for s in JobState)
    fields = "".join(
        f'<label>{label} <input name="{name}" value="{_e(query.get(name, ""))}" size=12'
        f' placeholder="{hint}"></label>'
        for name, label, hint in (("type", "type", ""), ("queue", "queue", ""),
                                  ("error", "error contains", ""),
                                  ("since", "created from", "2030-01-01T12:00Z"),
                                  ("until", "to", "ISO 8601")))
    return (f'<form id="filters" method="get" action="/console"><label>state <select name="state">'
            f'<option value="">any</option>{options}</select></label>{fields}'
            '<button type="submit">filter</button></form>')
