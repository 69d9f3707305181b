"""A worker reads its claimed jobs' payloads with load_json
(pulsed/db/rows.py), not json.loads: each handler must still see exactly
the payload json.loads makes of PostgreSQL's text of it."""

from __future__ import annotations

import json

import psycopg

import pulsed
from pulsed.api import HandlerRegistry

PAYLOADS = [
    {"i": 1},
    {},
    {"text": "ü ☃ 😀 \"quoted\" \\ back\nslash", "empty": ""},
    {"nested": {"list": [1, 2.5, None, True, False, "x", [], {}]}},
    {"big": 10 ** 30, "small": -1.5, "exp": 1e-300, "pi": 3.141592653589793},
    {"key with spaces ": "  value with spaces  "},
]


def test_handlers_see_the_payloads_json_loads_reads(dsn: str, conn: psycopg.Connection) -> None:
    ids = [pulsed.enqueue(conn, "t", payload) for payload in PAYLOADS]
    seen: dict[int, object] = {}
    registry = HandlerRegistry()
    registry.register("t", lambda job: seen.setdefault(job.id, job.payload))
    assert pulsed.run_worker(dsn, registry=registry, prefetch=3) == len(ids)
    for job_id in ids:
        text = conn.execute("SELECT payload::text FROM pulse_jobs WHERE id = %s",
                            (job_id,)).fetchone()[0]
        assert seen[job_id] == json.loads(text)
    assert [seen[job_id] for job_id in ids] == PAYLOADS
