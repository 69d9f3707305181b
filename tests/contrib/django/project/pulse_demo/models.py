from django.db import models


class Note(models.Model):
    text = models.TextField()


class SignalLog(models.Model):
    """One row per Tasks signal received (see apps.py), in order."""

    result_id = models.TextField()
    signal = models.TextField()
    status = models.TextField()
    errors = models.JSONField(default=list)
