"""A newcomer's handler module: beside pulse.toml, checked by --check-config,
and a node whose workers cannot import it showing as degraded everywhere."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import pulsed
from pulsed.worker_process import WORKER_GC_THRESHOLD
from tests.pg import wait_until
from tests.system.daemon import free_port

pytestmark = pytest.mark.timeout(120)

GOOD = '''
from pathlib import Path
import pulsed

@pulsed.handler("beside")
def beside(job):
    Path(job.payload["dir"], f"{job.id}.done").touch()
'''
BROKEN = "import pulsed\nraise RuntimeError('broken beside the config')\n"
EX_CONFIG = 78


def check_config(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real `pulsed --check-config`, from another folder, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "pulsed", "--config", str(config),
                           "--check-config"], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)


def test_a_handler_module_beside_the_config_runs_jobs_without_pythonpath(
        daemon_factory, conn, marks, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    daemon = daemon_factory(workers=1, config={"worker": {"handlers": ["myjobs_beside"]}},
                            env={"PYTHONPATH": None})
    (daemon.root / "myjobs_beside.py").write_text(GOOD)
    checked = check_config(daemon.config_path, elsewhere)
    assert checked.returncode == 0, checked.stderr
    assert "handler modules import: myjobs_beside" in checked.stdout

    daemon.start(cwd=elsewhere)
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "beside", {"dir": str(marks)})
    wait_until(lambda: (marks / f"{job_id}.done").exists(), timeout=20,
               message=f"the job never ran; log:\n{daemon.log_tail()}")
    assert daemon.status()["master"]["degraded"] is False


def test_worker_pythonpath_is_relative_to_the_config(daemon_factory, conn, marks, tmp_path):
    daemon = daemon_factory(workers=1, config={"worker": {
        "handlers": ["myjobs_lib"], "pythonpath": ["lib"]}}, env={"PYTHONPATH": None})
    (daemon.root / "lib").mkdir()
    (daemon.root / "lib" / "myjobs_lib.py").write_text(GOOD)
    assert check_config(daemon.config_path, tmp_path).returncode == 0
    daemon.start(cwd=tmp_path)
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "beside", {"dir": str(marks)})
    wait_until(lambda: (marks / f"{job_id}.done").exists(), timeout=20,
               message=f"the job never ran; log:\n{daemon.log_tail()}")


def test_check_config_imports_the_handler_modules_and_names_the_broken_one(tmp_path):
    config = tmp_path / "pulse.toml"
    config.write_text('[database]\nurl = "postgresql://nobody@localhost/none"\n'
                      '[worker]\nhandlers = ["myjobs_fine", "myjobs_broken"]\n')
    (tmp_path / "myjobs_fine.py").write_text(GOOD)
    (tmp_path / "myjobs_broken.py").write_text(BROKEN)
    checked = check_config(config, Path("/"))
    assert checked.returncode == EX_CONFIG, checked
    assert checked.stderr.count("\n") == 1 and "Traceback" not in checked.stderr
    assert "worker.handlers" in checked.stderr and "'myjobs_broken'" in checked.stderr
    assert "RuntimeError: broken beside the config" in checked.stderr
    assert "myjobs_broken.py:2" in checked.stderr  # where it broke

    (tmp_path / "myjobs_broken.py").unlink()
    checked = check_config(config, Path("/"))
    assert checked.returncode == EX_CONFIG
    assert "ModuleNotFoundError: No module named 'myjobs_broken'" in checked.stderr
    assert str(tmp_path) in checked.stderr  # where it looked


def _healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def test_a_node_whose_workers_cannot_boot_is_degraded_until_one_is_up(daemon_factory,
                                                                       tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    port = free_port()
    daemon = daemon_factory(workers=2, config={
        "worker": {"handlers": ["myjobs_cannot_boot"]},
        "api": {"enabled": True, "listen": f"127.0.0.1:{port}"}},
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    module = daemon.root / "myjobs_cannot_boot.py"
    module.write_text(BROKEN)
    daemon.start()
    statuses: list[str] = []

    def systemd_says(text: str) -> bool:
        while True:
            try:
                statuses.extend(line for line in notify.recv(65536).decode().splitlines()
                                if line.startswith("STATUS="))
            except BlockingIOError:
                return any(text in line for line in statuses)

    master = wait_until(lambda: daemon.status()["master"] if daemon.socket_path.exists()
                        and daemon.status()["master"]["degraded"] else None, timeout=30,
                        message=f"never degraded; log:\n{daemon.log_tail()}")
    assert master["state"] == "running"  # the states scripts know are unchanged
    assert "no worker up (0 of 2)" in master["degraded_reason"]
    assert "broken beside the config" in master["degraded_reason"]
    shown = subprocess.run([sys.executable, "-m", "pulsectl", "--socket",
                            str(daemon.socket_path), "status"], capture_output=True,
                           text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
    assert shown.returncode == 0 and "DEGRADED" in shown.stdout, shown
    code, health = wait_until(lambda: _healthz(port)[0] and _healthz(port), timeout=20,
                              message="the API never answered")
    assert code == 503 and health["checks"]["workers"]["ok"] is False, health
    assert "broken beside the config" in health["checks"]["workers"]["error"], health
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as reply:
        assert json.loads(reply.read())["master"]["degraded"] is True  # the page's banner
    wait_until(lambda: systemd_says("degraded: no worker up"), timeout=10,
               message=f"STATUS= never said degraded: {statuses}")

    module.write_text(GOOD)  # fixed: the next respawn boots
    wait_until(lambda: not daemon.status()["master"]["degraded"], timeout=60,
               message=f"still degraded; log:\n{daemon.log_tail()}")
    wait_until(lambda: _healthz(port)[0] == 200, timeout=20,
               message=f"/healthz stayed unhealthy: {_healthz(port)}")
    wait_until(lambda: systemd_says("") and "degraded" not in statuses[-1], timeout=10,
               message=f"STATUS= still degraded: {statuses[-3:]}")
    notify.close()


GC_PROBE = '''
import gc
from pathlib import Path
import pulsed
{setup}

@pulsed.handler("gc_probe")
def gc_probe(job):
    Path(job.payload["dir"], f"{{job.id}}.gc").write_text(str(gc.get_threshold()))
'''


@pytest.mark.parametrize("setup, young", [("", WORKER_GC_THRESHOLD),
                                          ("gc.set_threshold(1234)", 1234)])
def test_a_worker_collects_young_garbage_less_often_unless_its_handlers_say_otherwise(
        daemon_factory, conn, marks, setup, young):
    """A worker process raises the youngest generation's threshold (a
    batch's objects survived ~6 pointless collections at the default 700),
    before its handler modules import: one that sets its own keeps it."""
    daemon = daemon_factory(workers=1, config={"worker": {"handlers": ["myjobs_gc"]}})
    (daemon.root / "myjobs_gc.py").write_text(GC_PROBE.format(setup=setup))
    daemon.start(cwd=daemon.root)
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "gc_probe", {"dir": str(marks)})
    seen = marks / f"{job_id}.gc"
    wait_until(seen.exists, timeout=20, message=f"the job never ran; log:\n{daemon.log_tail()}")
    wait_until(lambda: seen.read_text(), timeout=5)
    threshold = eval(seen.read_text())  # noqa: S307 - a tuple of ints this test's handler wrote
    assert threshold[0] == young
    assert threshold[1:] == gc.get_threshold()[1:]  # the older generations' as CPython's
