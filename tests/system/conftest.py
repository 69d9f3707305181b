"""Fixtures for system tests: real `pulsed` daemons against the test database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.system.daemon import Daemon


@pytest.fixture
def daemon_factory(dsn: str, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make daemons (not started) on this test's database; all are killed
    as whole process groups at teardown."""
    made: list[Daemon] = []

    def make(name: str = "a", **kwargs: Any) -> Daemon:
        kwargs.setdefault("node_id", f"node-{name}")
        daemon = Daemon(tmp_path / name, dsn, **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill_all()


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    """A folder the test handlers drop event files into (payload 'dir')."""
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder
