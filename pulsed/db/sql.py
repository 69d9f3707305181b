"""The named queries of queries.sql (the only SQL Pulse runs, outside
migrations)."""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any, Mapping

from psycopg import sql

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")  # psycopg's escaped % and named placeholders


@functools.cache
def queries() -> dict[str, str]:
    """Every named query in queries.sql."""
    text = (resources.files("pulsed.db") / "queries.sql").read_text()
    parts = _QUERY_HEADER.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2])}


def with_literals(query: str, values: Mapping[str, Any], context: Any = None) -> str:
    """query with each `%(name)s` of `values` written in as a SQL literal
    (psycopg's quoting, for the connection `context`), the other
    placeholders left for the parameters it is executed with. For values
    a statement is sent with again and again: they are not dumped each
    time, and the server plans with them known, not as parameters. One
    pass over the query: a literal written in is never read again, so a
    value holding placeholder text stays text."""
    def literal(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None or name not in values:
            return match.group(0)  # %% or another parameter's placeholder
        # a % in a literal would read as a placeholder
        return sql.Literal(values[name]).as_string(context).replace("%", "%%")
    return _PLACEHOLDER.sub(literal, query)
