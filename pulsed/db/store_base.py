"""What every part of the Store shares: its connection, running a named
query, and waking the workers of some queues."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import psycopg
from psycopg.rows import dict_row

from pulsed.db.rows import fetch_tolerant
from pulsed.db.sql import queries

class StoreBase:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def _rows(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()[name], params)
            return cur.fetchall() if cur.description else []

    def _shown_rows(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """_rows() for what operators look at: a value Python cannot read
        is shown as PostgreSQL's text of it (an Unreadable), not an error."""
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()[name], params)
            return fetch_tolerant(cur) if cur.description else []

    def notify(self, queues: Sequence[str]) -> None:
        self.conn.execute(queries()["jobs_notify"], {"queues": list(queues)})
