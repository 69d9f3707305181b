"""database.pooler and database.listen_url: accepted as documented, and
every bad combination refused with an error naming the key."""

from __future__ import annotations

import pytest

from pulsed.config import parse_config
from pulsed.errors import ConfigError

URL = "postgresql://pulse@pgbouncer:6432/pulse"


def _error(database: dict, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"database": database}, env=env or {})
    return str(info.value)


def test_transaction_pooler_with_and_without_listen_url() -> None:
    config = parse_config({"database": {"url": URL, "pooler": "transaction"}}, env={})
    assert (config.database.pooler, config.database.listen_url) == ("transaction", None)
    config = parse_config({"database": {"url": URL, "pooler": "transaction",
                                        "listen_url": "postgresql://pulse@db/pulse"}}, env={})
    assert config.database.listen_url == "postgresql://pulse@db/pulse"


def test_default_is_no_pooler() -> None:
    assert parse_config({}, env={}).database.pooler is None


def test_from_the_environment() -> None:
    config = parse_config({}, env={"PULSE_DATABASE_URL": URL,
                                   "PULSE_DATABASE_POOLER": "transaction"})
    assert config.database.pooler == "transaction"


def test_unknown_pool_mode_is_refused() -> None:
    message = _error({"url": URL, "pooler": "session"})
    assert "database.pooler" in message and "'transaction'" in message and "'session'" in message


def test_pooler_needs_a_url() -> None:
    assert "database.pooler" in _error({"pooler": "transaction"})


def test_listen_url_needs_a_pooler() -> None:
    message = _error({"url": URL, "listen_url": "postgresql://pulse@db/pulse"})
    assert "database.listen_url" in message and "database.pooler" in message


def test_listen_url_must_be_text() -> None:
    assert "database.listen_url" in _error({"url": URL, "pooler": "transaction",
                                            "listen_url": 5})
