"""The named queries of queries.sql (the only SQL Pulse runs, outside
migrations)."""

from __future__ import annotations

import functools
import re
from importlib import resources

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@functools.cache
def queries() -> dict[str, str]:
    """Every named query in queries.sql."""
    text = (resources.files("pulsed.db") / "queries.sql").read_text()
    parts = _QUERY_HEADER.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2])}
