"""A minimal Django project for the PulseBackend tests: PostgreSQL through
psycopg 3 (the database in PULSE_DJANGO_DSN), two task backends."""

import os

import django
from psycopg.conninfo import conninfo_to_dict

_dsn = conninfo_to_dict(os.environ["PULSE_DJANGO_DSN"])
_named = {"dbname": "NAME", "user": "USER", "password": "PASSWORD", "host": "HOST",
          "port": "PORT"}

SECRET_KEY = "pulse-tests-only"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["pulse_demo"]
if django.VERSION < (6, 0):
    INSTALLED_APPS.append("django_tasks")  # the backport's checks and signals
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        **{_named[key]: value for key, value in _dsn.items() if key in _named},
        "OPTIONS": {key: value for key, value in _dsn.items() if key not in _named},
    },
    # The same database through psycopg's server-side binding (Django's
    # default is client-side): Pulse's statements must work with both.
    "bound": {
        "ENGINE": "django.db.backends.postgresql",
        **{_named[key]: value for key, value in _dsn.items() if key in _named},
        "OPTIONS": {**{key: value for key, value in _dsn.items() if key not in _named},
                    "server_side_binding": True},
    },
    # Not PostgreSQL: a backend pointed at it must say so.
    "sqlite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}
TASKS = {
    "default": {
        "BACKEND": "pulsed.contrib.django.PulseBackend",
        "QUEUES": ["default", "reports"],
    },
    "bound": {
        "BACKEND": "pulsed.contrib.django.PulseBackend",
        "OPTIONS": {"DATABASE": "bound"},
    },
    # No retries: a failing task is FAILED after its one attempt.
    "once": {
        "BACKEND": "pulsed.contrib.django.PulseBackend",
        "OPTIONS": {"MAX_ATTEMPTS": 1, "TIMEOUT": 30},
    },
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
