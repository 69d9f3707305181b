"""The real daemon with [api] on: the HTTP API child, /metrics across every
process (exact counts while workers recycle, bounded metric files), a real
Prometheus scraping it, the status page in headless Chromium, and
`pulsectl top`."""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

import pulsed
from pulsectl.top import run_top
from tests.pg import wait_until
from tests.system.daemon import Daemon, free_port
from tests.promtool import promtool_check

pytestmark = pytest.mark.timeout(240)

METRIC_FILES_BOUND = 24  # two a process (master, scheduler, api, 4 workers) + archives


def call(url: str, method: str = "GET", body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = body.encode() if isinstance(body, str) else (
        json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except OSError:
        return 0, {}, b""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(found: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in found.items()
               if n == name and set(labels.items()) <= set(ls))


class ApiDaemon:
    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon = daemon
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return call(self.url + path)

    def post(self, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
        return call(self.url + path, "POST", body)

    def metrics(self) -> dict:
        status, _, body = self.get("/metrics")
        assert status == 200, body
        return samples(body.decode())

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_until(lambda: self.get("/healthz")[0] == 200, timeout=timeout,
                   message=f"/healthz never said 200 (last: {self.get('/healthz')[2][:500]!r}); "
                           f"log:\n{self.daemon.log_tail()}")


@pytest.fixture
def api_daemon(daemon_factory) -> Iterator[Any]:
    def start(workers: int = 2, **config: dict[str, Any]) -> ApiDaemon:
        port = free_port()
        config.setdefault("api", {}).update({"enabled": True, "listen": f"127.0.0.1:{port}"})
        daemon = daemon_factory(workers=workers, config=config).start()
        daemon.wait_ready()
        running = ApiDaemon(daemon, port)
        running.wait_healthy()
        return running
    yield start


def job_state(conn: psycopg.Connection, job_id: int) -> str:
    return conn.execute("SELECT state::text FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()[0]


def test_the_api_child_serves_jobs_health_metrics_and_the_page(api_daemon, conn):
    node = api_daemon()
    status = node.daemon.status()
    assert [c["role"] for c in status["children"]].count("api") == 1, status["children"]

    code, headers, body = node.post("/jobs", '{"type":"noop","priority":1}')
    assert code == 201, body
    job_id = json.loads(body)["id"]
    wait_until(lambda: json.loads(node.get(f"/jobs/{job_id}")[2])["state"] == "completed",
               timeout=20, message="the job sent over HTTP never completed")
    repeat = {"type": "noop", "idempotency_key": "once"}
    first, second = node.post("/jobs", repeat), node.post("/jobs", repeat)
    assert (first[0], second[0]) == (201, 200)
    assert json.loads(first[2])["id"] == json.loads(second[2])["id"]
    for bad, field in (('{"type": ', "body"), ('{"priority": 1}', "type"),
                       ('{"type": "noop", "priority": "x"}', "priority")):
        code, _, body = node.post("/jobs", bad)
        assert code == 400 and json.loads(body)["error"]["field"] == field, body

    wait_until(lambda: total(node.metrics(), "pulse_jobs_total", type="noop",
                             outcome="completed") == 2, timeout=20,
               message="/metrics never counted the two completed jobs")
    found = node.metrics()
    assert total(found, "pulse_workers", state="idle") + \
        total(found, "pulse_workers", state="busy") == 2
    assert total(found, "pulse_leader_is_local") == 1
    assert total(found, "pulse_jobs_enqueued_total", source="http", type="noop") == 2
    assert total(found, "pulse_job_duration_seconds_count", type="noop") == 2

    page = node.get("/")
    assert page[0] == 200 and b"<title>Pulse status</title>" in page[2]
    data = json.loads(node.get("/status.json")[2])
    assert {c["role"] for c in data["children"]} == {"scheduler", "worker", "api"}
    promtool_check(node.get("/metrics")[2].decode())


def test_a_thousand_jobs_over_recycling_workers_are_counted_exactly(api_daemon, conn):
    """4 workers recycled every 10 jobs: /metrics counts every outcome once,
    and the per-process metric files do not pile up."""
    node = api_daemon(workers=4, worker={"max_jobs": 10})
    metrics_dir = node.daemon.state_dir / "metrics"
    jobs = [{"type": "noop"} for _ in range(950)]
    jobs += [{"type": "boom", "max_attempts": 1} for _ in range(50)]  # raises: fails
    pulsed.enqueue_many(conn, jobs)
    most_files = 0

    def finished() -> bool:
        nonlocal most_files
        most_files = max(most_files, len(list(metrics_dir.glob("*.db"))))
        return conn.execute("SELECT count(*) FROM pulse_jobs WHERE state IN "
                            "('completed', 'failed')").fetchone()[0] == 1000

    wait_until(finished, timeout=180, interval=0.2,
               message=f"the 1000 jobs did not finish; log:\n{node.daemon.log_tail()}")
    found = node.metrics()
    assert total(found, "pulse_jobs_total") == 1000, \
        {k: v for k, v in found.items() if k[0] == "pulse_jobs_total"}
    assert total(found, "pulse_jobs_total", type="noop", outcome="completed") == 950
    assert total(found, "pulse_jobs_total", type="boom", outcome="failed") == 50
    assert total(found, "pulse_job_duration_seconds_count") == 1000
    recycled = total(found, "pulse_child_restarts_total", role="worker", reason="recycle")
    assert recycled >= 60, f"only {recycled} recycles"
    assert most_files <= METRIC_FILES_BOUND, f"{most_files} metric files at once"
    assert total(found, "pulse_metrics_files") <= METRIC_FILES_BOUND


def test_a_real_prometheus_scrapes_the_daemon(api_daemon, tmp_path, conn):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    node = api_daemon()
    pulsed.enqueue(conn, "noop", {})
    port = free_port()
    target = node.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: pulse\n    static_configs:\n"
        f"      - targets: ['{target}']\n")
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        def query(expr: str) -> list[dict[str, Any]]:
            status, _, body = call(f"http://127.0.0.1:{port}/api/v1/query?"
                                   + urllib.parse.urlencode({"query": expr}))
            return json.loads(body)["data"]["result"] if status == 200 else []

        wait_until(lambda: [r for r in query('up{job="pulse"}') if r["value"][1] == "1"],
                   timeout=60, interval=0.5, message="Prometheus never scraped pulse: "
                   + (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:])
        result = wait_until(lambda: query('pulse_jobs_total{outcome="completed"}'),
                            timeout=30, interval=0.5, message="no pulse_jobs_total in Prometheus")
        assert result[0]["metric"]["type"] == "noop"
        assert query("pulse_database_up")[0]["value"][1] == "1"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def test_the_status_page_shows_workers_and_queues_in_chromium(api_daemon, tmp_path, conn):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    node = api_daemon()
    pulsed.enqueue(conn, "noop", {}, delay=3600)  # a queue with something in it
    wait_until(lambda: json.loads(node.get("/status.json")[2]).get("queues"), timeout=10)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = run_browser([*flags, "--dump-dom", node.url + "/"]).decode()
    assert dom.count('data-role="worker"') == 2, dom[-3000:]
    assert "idle" in dom and "scheduler" in dom
    assert "<td>noop</td>" in dom and "scheduled" in dom
    assert "node-a" in dom
    shot = tmp_path / "status.png"
    run_browser([*flags, "--window-size=1280,800", f"--screenshot={shot}", node.url + "/"])
    assert shot.exists() and shot.stat().st_size > 10_000
    keep = os.environ.get("PULSE_SCREENSHOT")  # where to keep the picture, if anywhere
    if keep:
        shutil.copy(shot, keep)


def run_browser(args: list[str]) -> bytes:
    """Run headless Chromium in its own session; its stdout. Whatever helper
    it left behind goes with the session."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return out


# What a shell does before it runs a command in the foreground of its terminal:
# its own session with the terminal as the controlling one, and SIGINT's
# default action. Without the reset the child inherits pytest's disposition,
# and a pytest started as a background job (`pytest &` in a non-interactive
# shell) ignores SIGINT: so did `top`, and this test timed out in such runs.
AS_FROM_A_SHELL = (
    "import fcntl, signal, sys, termios; "
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from pulsectl.top import run_top; "
    "sys.exit(run_top(sys.argv[1], sys.argv[2], interval=0.2))")


def test_pulsectl_top_shows_workers_and_quits_on_ctrl_c(api_daemon, conn):
    node = api_daemon()
    pulsed.enqueue_many(conn, [{"type": "noop"} for _ in range(20)])
    console = Console(file=io.StringIO(), width=120, record=True, force_terminal=False)
    assert run_top(node.daemon.socket_path, node.daemon.dsn, interval=0.3, console=console,
                   iterations=3) == 0
    screen = console.export_text()
    assert screen.count("worker") >= 2 and "last minute" in screen
    assert "refreshing every 0.3s" in screen

    leader, follower = pty.openpty()  # a terminal, as a person would run it
    proc = subprocess.Popen([sys.executable, "-c", AS_FROM_A_SHELL, str(node.daemon.socket_path),
                             node.daemon.dsn], stdin=follower, stdout=follower,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]),
                                 "COLUMNS": "120", "LINES": "40", "TERM": "xterm"})
    os.close(follower)
    try:
        os.set_blocking(leader, False)
        seen = bytearray()

        def draws(what: bytes) -> bool:
            try:
                seen.extend(os.read(leader, 65536))
            except (BlockingIOError, OSError):
                pass
            return what in seen

        wait_until(lambda: draws(b"worker"), timeout=20,
                   message=f"top never drew the workers: {bytes(seen)[-500:]!r}")
        os.write(leader, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
