"""Pulse as a backend for Django's Tasks framework (django.tasks on
Django >= 6.0, the django-tasks backport on Django 5.2).

Web side, in settings.py:

    TASKS = {"default": {"BACKEND": "pulsed.contrib.django.PulseBackend"}}

Worker side, in pulse.toml (with DJANGO_SETTINGS_MODULE in the daemon's
environment):

    [worker]
    handlers = ["pulsed.contrib.django.worker"]
"""

from pulsed.contrib.django.backend import PulseBackend

__all__ = ["PulseBackend"]
