"""Receivers of the Tasks signals, in the web process (enqueued) and in
the worker processes (started, finished): each writes a SignalLog row."""

from django.dispatch import receiver

try:
    from django.tasks.signals import task_enqueued, task_finished, task_started
except ImportError:  # Django 5.2: the backport
    from django_tasks.signals import task_enqueued, task_finished, task_started

from pulse_demo.models import SignalLog


def _log(name, task_result):
    SignalLog.objects.create(result_id=task_result.id, signal=name,
                             status=str(task_result.status),
                             errors=[e.exception_class_path for e in task_result.errors])


@receiver(task_enqueued)
def enqueued(sender, task_result, **kwargs):
    _log("enqueued", task_result)


@receiver(task_started)
def started(sender, task_result, **kwargs):
    _log("started", task_result)


@receiver(task_finished)
def finished(sender, task_result, **kwargs):
    _log("finished", task_result)
