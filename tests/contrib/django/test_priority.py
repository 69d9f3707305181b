"""Django's priority decides which task a real worker runs first."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pulsed

from tests.contrib.django.conftest import django_daemon


def test_higher_django_priority_runs_first(django_dsn: str, probe: psycopg.Connection,
                                           tmp_path: Path) -> None:
    """Low-priority jobs enqueued first (lower ids: first in FIFO order),
    then high-priority ones; a worker running one job at a time, started
    only once all six wait, runs the high ones first. The order is the
    worker's task_started signals, logged in the order they ran."""
    from django.db import transaction
    from pulse_demo.models import SignalLog
    from pulse_demo.tasks import add
    with transaction.atomic():
        low = [add.using(priority=-100).enqueue(0, i).id for i in range(3)]
        high = [add.using(priority=100).enqueue(1, i).id for i in range(3)]
    daemon = django_daemon(tmp_path / "serial", django_dsn, concurrency=1).start()
    try:
        for result_id in low + high:
            pulsed.wait(probe, int(result_id), timeout=30)
    finally:
        daemon.kill_all()
    ran = list(SignalLog.objects.filter(signal="started", result_id__in=low + high)
               .order_by("pk").values_list("result_id", flat=True))
    assert sorted(ran[:3]) == sorted(high) and sorted(ran[3:]) == sorted(low), ran
