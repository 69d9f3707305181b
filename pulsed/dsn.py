"""Which database a process talks to: the configured URL, or the embedded server."""

from __future__ import annotations

from pulsed.config import Config
from pulsed.db.embedded import ensure_embedded


def resolve_dsn(config: Config) -> str:
    """``database.url``, or the DSN of the embedded PostgreSQL in the state
    directory (started now if it is not running) when no URL is configured."""
    if config.database.url:
        return config.database.url
    return ensure_embedded(config.daemon.state_dir)
