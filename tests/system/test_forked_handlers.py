"""A handler that forks must not leave a rogue worker behind (issue 23 item 3).

The forked child returns into Pulse's code with a copy of the worker's
connection, lease tokens and ledger. It must leave at once, claim and write
nothing, and no process of a handler's making may outlive its worker or
pulsed itself.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

import pulsed
from pulsed.db.store import Store
from tests.chaos.harness import record_result
from tests.pg import wait_until
from tests.system.daemon import pid_alive

pytestmark = pytest.mark.timeout(90)

LATER_JOBS = 20
CHILD_DOES = {"exit": "raises SystemExit", "return": "returns",
              "sleep": "stays alive (sleeps 300 s)"}


def _pids(marks: Path, what: str) -> set[int]:
    return {int(path.name.split(".")[2]) for path in marks.glob(f"*.{what}")}


@pytest.mark.parametrize("child, concurrency", [
    ("exit", 1), ("return", 1), ("sleep", 1),
    ("exit", 2),  # forked from a job thread: the child returns into the thread's runner
])
def test_a_handlers_forked_child_claims_and_writes_nothing_and_dies_with_pulsed(
        daemon_factory, conn, marks, child, concurrency):
    daemon = daemon_factory(workers=1,
                            config={"worker": {"concurrency": concurrency}}).start()
    daemon.wait_ready()
    worker_pid = next(iter(daemon.workers()))
    job_id = pulsed.enqueue(conn, "fork", {"child": child, "dir": str(marks)}, max_attempts=1)
    wait_until(lambda: _pids(marks, "forked"), timeout=10, message="the handler never forked")
    later = [pulsed.enqueue(conn, "noop", {"dir": str(marks)}) for _ in range(LATER_JOBS)]
    store = Store(conn)
    wait_until(lambda: all(store.get_job(i).state.value == "completed" for i in [job_id, *later]),
               timeout=20, message=f"the jobs did not complete; log:\n{daemon.log_tail()}")

    forked = _pids(marks, "forked")
    assert len(forked) == 1
    # Every job ran in the worker, once; the forked child ran none.
    assert _pids(marks, "done") == {worker_pid}, "a job ran in a process other than the worker"
    assert len(list(marks.glob("*.done"))) == LATER_JOBS + 1
    record = store.get_job(job_id)
    assert record.attempt == 1 and [a.outcome for a in record.attempts] == ["completed"]
    assert all(store.get_job(i).attempt == 1 for i in later)
    # The child, had it gone on, would have recorded its SystemExit as the
    # job's failure under the worker's lease: no such attempt exists.
    rows = conn.execute("SELECT outcome, error_message FROM pulse_job_attempts").fetchall()
    assert rows == []

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=15) == 0
    stopped = time.monotonic()
    wait_until(lambda: not any(pid_alive(p) for p in forked), timeout=5,
               message=f"the handler's forked child {forked} outlived pulsed")
    record_result(fault=f"a handler forks; its child {CHILD_DOES[child]}",
                  load=f"1 forking job, then {LATER_JOBS} no-op jobs, 1 worker, "
                       f"concurrency {concurrency}",
                  lost=0, stuck=0, duplicates=len(list(marks.glob("*.done"))) - LATER_JOBS - 1,
                  recovery_s=None, jobs_run_by_the_child=0,
                  child_gone_after_stop_s=round(time.monotonic() - stopped, 3))
