"""Pulse as a backend for Django's Tasks framework (django.tasks on
Django >= 6.0, the django-tasks backport on Django 5.2).

Web side, in settings.py:

    TASKS = {"default": {"BACKEND": "pulsed.contrib.django.PulseBackend"}}

Worker side, in pulse.toml (with DJANGO_SETTINGS_MODULE in the daemon's
environment):

    [worker]
    handlers = ["pulsed.contrib.django.worker"]
"""

from __future__ import annotations

from typing import Any

__all__ = ["PulseBackend"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that pulsed.contrib.django.mapping (no
    # Django in it) imports without Django installed.
    if name == "PulseBackend":
        from pulsed.contrib.django.backend import PulseBackend
        return PulseBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
