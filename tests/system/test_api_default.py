"""The API is on by default (issue 24, item 4): a daemon started from
`pulsectl config init`'s file answers SPEC §7's curl example,
`curl -X POST http://localhost:8080/jobs -d '{"type":"email","priority":1}'`."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys

import pytest
import tomli_w

from tests.pg import wait_until
from tests.system.daemon import REPO

pytestmark = pytest.mark.timeout(120)

DEFAULT_LISTEN = '"127.0.0.1:8080"'
CURL_BODY = b'{"type":"email","priority":1}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def curl_post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    """What `curl -X POST http://localhost:PORT/jobs -d BODY` sends, header for
    header: -d makes it a form post, and curl sends no Origin."""
    conn = http.client.HTTPConnection("localhost", port, timeout=10)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)  # sets Host: localhost:PORT
        for name, value in (("User-Agent", "curl/8.5.0"), ("Accept", "*/*"),
                            ("Content-Length", str(len(body))),
                            ("Content-Type", "application/x-www-form-urlencoded")):
            conn.putheader(name, value)
        conn.endheaders(body)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_the_curl_example_works_against_a_daemon_from_config_init(daemon_factory, tmp_path, dsn):
    path = tmp_path / "init" / "pulse.toml"
    path.parent.mkdir()
    done = subprocess.run([sys.executable, "-m", "pulsectl", "config", "init", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    text = path.read_text()
    api = text[text.index("[api]"):]
    assert re.search(r"^enabled = true\b", api, re.M), api
    assert re.search(rf"^listen = {re.escape(DEFAULT_LISTEN)}", api, re.M), api
    port = free_port()  # 8080 itself may be taken by another test run on this machine
    daemon = daemon_factory()
    daemon.config_path.write_text(text.replace(DEFAULT_LISTEN, f'"127.0.0.1:{port}"'))
    daemon.env.update({"PULSE_DATABASE_URL": dsn, "PULSE_DAEMON_STATE_DIR": str(daemon.state_dir),
                       "PULSE_DAEMON_SOCKET": str(daemon.socket_path)})
    daemon.start()
    wait_until(lambda: answers(port), timeout=30,
               message=f"the API never listened on port {port}; log:\n{daemon.log_tail()}")
    status, job = curl_post(port, "/jobs", CURL_BODY)
    assert status == 201, job
    assert (job["type"], job["priority"], job["state"]) == ("email", 1, "available")
    # The api child serves first and logs after, so the line may trail the reply.
    line = f"HTTP API listening on http://127.0.0.1:{port}"
    wait_until(lambda: line in daemon.log_text(), timeout=10,
               message=f"no start-up line for the API; log:\n{daemon.log_tail()}")


MYJOBS = '''import pulsed

@pulsed.handler("email", max_attempts=5, timeout=30)
def send_email(job):
    print("sending to", job.payload.get("to", "nobody"))
'''


def test_the_first_hour_as_the_readme_walks_it(daemon_factory, conn):
    """README "Your first hour", steps 3 and 4: a job no worker handles
    waits (available, its attempts unused) and status warns of it; once a
    handler module is configured and pulsed restarted, it runs at once,
    attempt 1 of the handler's 5. The README said it would fail and run
    at its next retry, which stopped being true when workers began to
    claim only the types they handle."""
    port = free_port()
    daemon = daemon_factory(workers=1, config={
        "worker": {"handlers": []}, "api": {"enabled": True, "listen": f"127.0.0.1:{port}"}})
    daemon.start()
    daemon.wait_ready()
    wait_until(lambda: answers(port), timeout=30,
               message=f"the API never listened on port {port}; log:\n{daemon.log_tail()}")
    status, job = curl_post(port, "/jobs", CURL_BODY)
    assert status == 201, job
    wait_until(lambda: [t["type"] for t in daemon.status().get("unhandled_types", [])]
               == ["email"], timeout=30,
               message=f"status never warned of the unhandled type; log:\n{daemon.log_tail()}")
    state, attempt = conn.execute("SELECT state, attempt FROM pulse_jobs WHERE id = %s",
                                  (job["id"],)).fetchone()
    assert (state, attempt) == ("available", 0)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log_tail()

    (daemon.root / "myjobs.py").write_text(MYJOBS)  # beside pulse.toml, as the README says
    daemon.config["worker"]["handlers"] = ["myjobs"]
    daemon.config_path.write_text(tomli_w.dumps(daemon.config))
    daemon.start()
    wait_until(lambda: conn.execute("SELECT state FROM pulse_jobs WHERE id = %s",
                                    (job["id"],)).fetchone()[0] == "completed",
               timeout=30, message=f"the job never completed; log:\n{daemon.log_tail()}")
    attempt, max_attempts = conn.execute(
        "SELECT attempt, max_attempts FROM pulse_jobs WHERE id = %s", (job["id"],)).fetchone()
    assert (attempt, max_attempts) == (1, 5)
    wait_until(lambda: f"[email#{job['id']}] sending to nobody" in daemon.log_text(),
               timeout=10, message=f"no handler output in the log:\n{daemon.log_tail()}")
