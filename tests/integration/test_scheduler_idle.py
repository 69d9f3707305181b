"""The scheduler's loop builds its metrics between polls, not in the first
tick that needs them (a cron enqueue, a reaped lease: prometheus_client's
import, 20-60 ms, in the tick; the reaper's before it sent its wake-up)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys
    from types import SimpleNamespace
    from pulsed.config import default_config
    from pulsed.leadership import Leadership
    from pulsed.scheduler import SchedulerLoop

    polls = []
    SchedulerLoop.poll = lambda self: polls.append("prometheus_client" in sys.modules)
    runtime = SimpleNamespace(
        ctx=SimpleNamespace(config=default_config(), dsn=sys.argv[1], alone=True),
        should_stop=lambda: len(polls) >= 2)
    SchedulerLoop(runtime, Leadership("node/1", 15)).run()
    print(polls)
""")


def test_the_scheduler_builds_its_metrics_after_its_first_poll(dsn: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, dsn], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[False, True]"
