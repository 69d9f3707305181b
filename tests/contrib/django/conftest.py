"""A real Django project (project/pulse_demo) on the test PostgreSQL, and a
real `pulsed` daemon whose workers run its tasks.

Django is set up once per test session (django.setup() cannot be undone),
on one database of its own made from the migrated template; tests tell
their jobs apart by id. Without Django and its Tasks framework these tests
skip, saying why."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.pg import create_database, drop_database, unique_name
from tests.system.daemon import Daemon

PROJECT = Path(__file__).resolve().parent / "project"
SETTINGS = "pulse_demo.settings"


def _missing() -> str | None:
    if importlib.util.find_spec("django") is None:
        return "Django is not installed (pip install 'pulse-queue[django]')"
    import django
    if django.VERSION < (6, 0) and importlib.util.find_spec("django_tasks") is None:
        return (f"Django {django.get_version()} has no django.tasks and the django-tasks "
                f"backport is not installed (pip install 'pulse-queue[django]')")
    return None


# Set by CI's Python >= 3.12 leg (Django 6): a missing Django there is a failure, not a skip.
REQUIRED_VARIABLE = "PULSE_DJANGO_REQUIRED"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _missing()
    if reason and os.environ.get(REQUIRED_VARIABLE):
        raise pytest.UsageError(f"{REQUIRED_VARIABLE} is set but {reason}")
    if reason:
        here = str(Path(__file__).parent)
        for item in items:
            if str(item.path).startswith(here):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def django_dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """The project's database: migrated for Pulse, Django's tables added;
    Django set up on it in this process."""
    name = unique_name("pulse_django")
    dsn = create_database(admin_dsn, name, template=template_db)
    saved = {key: os.environ.get(key) for key in ("PULSE_DJANGO_DSN", "DJANGO_SETTINGS_MODULE")}
    os.environ["PULSE_DJANGO_DSN"] = dsn
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    sys.path.insert(0, str(PROJECT))
    import django
    from django.core.management import call_command
    from django.db import connections
    django.setup()
    call_command("migrate", run_syncdb=True, verbosity=0)
    try:
        yield dsn
    finally:
        connections.close_all()
        drop_database(admin_dsn, name)
        for key, value in saved.items():  # later tests' daemons inherit os.environ
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True, scope="module")
def close_django_connections() -> Iterator[None]:
    """No idle Django connection outlives a test module (the rest of the
    suite counts connections and processes)."""
    yield
    if "django.db" in sys.modules:
        from django.db import connections
        connections.close_all()


def django_daemon(root: Path, dsn: str, *, concurrency: int) -> Daemon:
    """A real daemon (not started) with one worker process that imports
    pulsed.contrib.django.worker (django.setup() there) and runs the
    tasks: sync ones on threads, async ones on its event loop."""
    return Daemon(root, dsn, workers=1,
                  config={"worker": {"handlers": ["pulsed.contrib.django.worker"],
                                     "pythonpath": [str(PROJECT)],
                                     "concurrency": concurrency}},
                  env={"DJANGO_SETTINGS_MODULE": SETTINGS, "PULSE_DJANGO_DSN": dsn})


@pytest.fixture(scope="module")
def pulse_daemon(django_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One running daemon for the module, four jobs at once."""
    daemon = django_daemon(tmp_path_factory.mktemp("django-daemon"), django_dsn, concurrency=4)
    daemon.start()
    try:
        daemon.wait_ready(timeout=30)
        yield daemon
    finally:
        daemon.kill_all()


@pytest.fixture
def probe(django_dsn: str) -> Iterator[psycopg.Connection]:
    """A second connection, outside Django's: what other sessions (workers)
    see."""
    with psycopg.connect(django_dsn, autocommit=True) as conn:
        yield conn
