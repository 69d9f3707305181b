"""The embedded database has one owner, and everyone else finds it (issue 24,
items 5 and 6): pulsed prints its URL, `pulsectl config dsn` and
`pulsed.connect()` find it through the state dir, job commands never start
it (exit 3 saying to start pulsed), and a pulsed that finds one left running
by a killed pulsed adopts it and stops it on exit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

import pulsed
from pulsed.db.embedded import EmbeddedPostgres
from pulsed.dsn import EMBEDDED_DIR
from tests.pg import wait_until
from tests.system.daemon import REPO, Daemon

pytestmark = pytest.mark.timeout(240)

EXIT_UNREACHABLE = 3
URL_LINE = re.compile(r"applications connect to (\S+)")


def pulsectl(*argv: str, cwd: Path = REPO, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pulsectl", *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def embedded_daemon(daemon_factory) -> Daemon:
    """A daemon with no database.url: it runs the embedded server."""
    daemon = daemon_factory(workers=1)
    daemon.config.pop("database")
    daemon.config_path.write_text(tomli_w.dumps(daemon.config))
    daemon.env["PULSE_DATABASE_URL"] = ""  # an empty variable unsets the key
    return daemon


def printed_url(daemon: Daemon) -> str:
    found = URL_LINE.findall(daemon.log_text())
    assert found, f"pulsed never printed the embedded server's URL; log:\n{daemon.log_tail()}"
    return found[-1]


def test_the_embedded_database_is_found_owned_and_never_started_by_pulsectl(
        daemon_factory, tmp_path: Path) -> None:
    daemon = embedded_daemon(daemon_factory)
    config = str(daemon.config_path)
    server = EmbeddedPostgres(daemon.state_dir / EMBEDDED_DIR)
    daemon.start()
    daemon.wait_ready(timeout=90)
    url = printed_url(daemon)

    shown = pulsectl("--config", config, "config", "dsn")
    assert (shown.returncode, shown.stdout.strip()) == (0, url), shown.stderr
    described = json.loads(pulsectl("--config", config, "config", "dsn", "--json").stdout)
    assert (described["dsn"], described["source"]) == (url, "embedded")
    added = pulsectl("--config", config, "enqueue", "nobody-handles-this")
    assert added.returncode == 0, added.stderr
    job_id = int(added.stdout)
    with _connect(config) as conn:  # a script, as the README shows it
        assert conn.execute("SELECT type FROM pulse_jobs WHERE id = %s",
                            (job_id,)).fetchone() == ("nobody-handles-this",)

    # From a folder with no pulse.toml, a state dir with no daemon: no
    # database, said plainly, rather than another database's jobs.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = pulsectl("jobs", cwd=elsewhere,
                     env={"PULSE_DAEMON_STATE_DIR": str(tmp_path / "other-state")})
    assert other.returncode == EXIT_UNREACHABLE, other.stdout
    assert "Start pulsed" in other.stderr and "no config file" in other.stderr
    same = pulsectl("--json", "jobs", cwd=elsewhere,
                    env={"PULSE_DAEMON_STATE_DIR": str(daemon.state_dir)})
    assert same.returncode == 0, same.stderr
    assert [job["id"] for job in json.loads(same.stdout)["jobs"]] == [job_id]
    assert f"embedded database of the pulsed in {daemon.state_dir}" in same.stderr

    # A pulsed killed outright leaves its server; the next one adopts it.
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit()
    assert server.is_running()
    daemon.start()
    daemon.wait_ready(timeout=90)
    assert "adopting the embedded PostgreSQL" in daemon.log_text()
    assert printed_url(daemon) == url
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=60) == 0
    wait_until(lambda: not server.is_running(), timeout=30,
               message="the owner pulsed left its embedded server running")

    for argv in (["jobs"], ["job", str(job_id)], ["retry", str(job_id)],
                 ["cancel", str(job_id)], ["enqueue", "email"], ["config", "dsn"]):
        result = pulsectl("--config", config, *argv)
        assert result.returncode == EXIT_UNREACHABLE, (argv, result.stdout, result.stderr)
        assert "Start pulsed first" in result.stderr, result.stderr
    assert not server.is_running(), "a pulsectl command started the embedded server"


def _connect(config: str):
    previous = os.environ.pop("PULSE_DATABASE_URL", None)
    try:
        return pulsed.connect(config, autocommit=True)
    finally:
        if previous is not None:
            os.environ["PULSE_DATABASE_URL"] = previous
