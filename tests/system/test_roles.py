"""`pulsed --role worker|scheduler|api`: each role alone in its process, as
an orchestrator runs them: jobs flow, probes answer, TERM drains, and a
killed worker's job comes back through the leader's reaper."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import pytest

import pulsed
from tests.pg import wait_until
from tests.system.daemon import free_port

pytestmark = pytest.mark.timeout(90)


def probe(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def start_role(daemon_factory, role: str, name: str, **config):
    port = free_port()
    sections = {"worker": {"lease_ttl": 2}, **config}
    sections["daemon"] = {**config.get("daemon", {}), "health_listen": f"127.0.0.1:{port}"}
    daemon = daemon_factory(name, role=role, config=sections).start()
    daemon.health_port = port
    return daemon


def started(marks, job_id: int) -> bool:
    """The handler began (tests/system/jobs.py marks it): a job merely claimed
    is `running` in the table too, and a stop gives it back untouched."""
    return any(marks.glob(f"{job_id}.*.start"))


def job_state(conn, job_id: int) -> str:
    return conn.execute("SELECT state::text FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()[0]


def test_a_lone_scheduler_and_worker_run_jobs_and_answer_probes(daemon_factory, conn, marks):
    scheduler = start_role(daemon_factory, "scheduler", "sched")
    worker = start_role(daemon_factory, "worker", "w1")
    for daemon in (scheduler, worker):
        wait_until(lambda d=daemon: probe(d.health_port, "/readyz")[0] == 200, timeout=20,
                   message=lambda d=daemon: f"{d.role} never ready:\n{d.log_tail()}")
        status, body = probe(daemon.health_port, "/healthz")
        assert status == 200 and body["role"] == daemon.role, body
    job_id = pulsed.enqueue(conn, "sleep", {"s": 0.1, "dir": str(marks)})
    wait_until(lambda: job_state(conn, job_id) == "completed", timeout=20,
               message=lambda: worker.log_tail())
    assert probe(worker.health_port, "/nope")[0] == 404
    registered = conn.execute("SELECT count(*) FROM pulse_processes WHERE node_id = 'node-w1' "
                              "AND role = 'worker'").fetchone()[0]
    assert registered == 1  # so the leader knows a live worker handles its types


def test_term_lets_the_running_job_finish_then_the_worker_exits_0(daemon_factory, conn, marks):
    worker = start_role(daemon_factory, "worker", "w1")
    wait_until(lambda: probe(worker.health_port, "/readyz")[0] == 200, timeout=20)
    job_id = pulsed.enqueue(conn, "sleep", {"s": 1.5, "dir": str(marks)})
    wait_until(lambda: started(marks, job_id), timeout=20, message="the job never started")
    worker.signal(signal.SIGTERM)
    wait_until(lambda: probe(worker.health_port, "/readyz")[0] in (503, 0), timeout=5,
               message="still ready while stopping")
    assert worker.wait_exit(timeout=15) == 0
    assert job_state(conn, job_id) == "completed"


def test_a_killed_lone_worker_s_job_comes_back_through_the_reaper(daemon_factory, conn, marks):
    scheduler = start_role(daemon_factory, "scheduler", "sched")
    first = start_role(daemon_factory, "worker", "w1")
    wait_until(lambda: probe(first.health_port, "/readyz")[0] == 200, timeout=20)
    job_id = pulsed.enqueue(conn, "sleep_first", {"s": 60, "dir": str(marks)})
    wait_until(lambda: started(marks, job_id), timeout=20, message="the job never started")
    first.kill_all()  # kill -9, and no master to release its lease
    second = start_role(daemon_factory, "worker", "w2")
    wait_until(lambda: job_state(conn, job_id) == "completed", timeout=40,
               message=lambda: f"{scheduler.log_tail()}\n{second.log_tail()}")
    outcome = conn.execute("SELECT outcome FROM pulse_job_attempts WHERE job_id = %s "
                           "ORDER BY attempt LIMIT 1", (job_id,)).fetchone()[0]
    assert outcome == "lease_expired"


def test_a_lone_api_serves_jobs_without_a_master(daemon_factory, conn):
    port = free_port()
    api = daemon_factory("api", role="api", config={
        "api": {"enabled": True, "listen": f"127.0.0.1:{port}"}}).start()
    wait_until(lambda: probe(port, "/readyz")[0] in (200, 503), timeout=20,
               message=lambda: api.log_tail())
    request = urllib.request.Request(f"http://127.0.0.1:{port}/jobs", method="POST",
                                     data=json.dumps({"type": "noop"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.status == 201
        job_id = json.loads(reply.read())["id"]
    assert job_state(conn, job_id) == "available"
    status, body = probe(port, "/healthz")
    assert "master" not in body["checks"], body  # nothing to ask: no master here
    assert body["checks"]["database"]["ok"] is True


def test_a_role_without_a_database_url_is_refused(daemon_factory):
    lone = daemon_factory("x", role="worker", config={"database": {"url": ""}})
    lone.config["database"].pop("url")
    lone.config_path.write_text(__import__("tomli_w").dumps(lone.config))
    lone.start()
    assert lone.wait_exit(timeout=20) == 78
    assert "--role needs database.url" in lone.log_text()


def test_a_lone_worker_past_stop_timeout_exits_and_leaves_the_job_to_lease_expiry(
        daemon_factory, conn, marks):
    worker = start_role(daemon_factory, "worker", "w1", daemon={"stop_timeout": 1})
    wait_until(lambda: probe(worker.health_port, "/readyz")[0] == 200, timeout=20)
    job_id = pulsed.enqueue(conn, "sleep", {"s": 60, "dir": str(marks)})
    wait_until(lambda: started(marks, job_id), timeout=20, message="the job never started")
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(timeout=10) == 0
    assert "daemon.stop_timeout" in worker.log_text()
    assert job_state(conn, job_id) == "running"  # until its lease expires (the reaper's)


def test_a_killed_lone_scheduler_is_replaced_by_another_that_leads(daemon_factory, conn, marks):
    first = start_role(daemon_factory, "scheduler", "s1")
    wait_until(lambda: probe(first.health_port, "/readyz")[0] == 200, timeout=20)
    wait_until(lambda: conn.execute("SELECT leader_id FROM pulse_leader WHERE expires_at > now()"
                                    ).fetchone(), timeout=20, message="no leader")
    first.kill_all()  # kill -9: its lease must expire (no resign)
    second = start_role(daemon_factory, "scheduler", "s2")
    wait_until(lambda: (conn.execute("SELECT leader_id FROM pulse_leader WHERE expires_at > "
                                     "now()").fetchone() or ("",))[0].startswith("node-s2/"),
               timeout=30, message=lambda: f"the new scheduler never led:\n{second.log_tail()}")
    worker = start_role(daemon_factory, "worker", "w1")
    job_id = pulsed.enqueue(conn, "sleep", {"s": 0.1, "dir": str(marks)}, delay=0.5)
    wait_until(lambda: job_state(conn, job_id) == "completed", timeout=30,
               message=lambda: worker.log_tail())  # promoted by the new leader, then run


def test_a_killed_lone_api_is_replaced_on_the_same_port(daemon_factory, conn):
    port = free_port()
    config = {"api": {"enabled": True, "listen": f"127.0.0.1:{port}"}}
    first = daemon_factory("api1", role="api", config=config).start()
    # 503 without a leader (no scheduler here): still, it answers
    wait_until(lambda: probe(port, "/readyz")[0] in (200, 503), timeout=20,
               message=first.log_tail)
    first.kill_all()
    wait_until(lambda: probe(port, "/readyz")[0] == 0, timeout=10, message="still answering")
    second = daemon_factory("api2", role="api", config=config).start()
    wait_until(lambda: probe(port, "/readyz")[0] in (200, 503), timeout=20,
               message=second.log_tail)
