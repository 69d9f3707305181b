"""Rolling upgrades: two versions of Pulse on one database at once, as in a
fleet deploy (hosts upgraded one by one). Older versions come from this
repository's git history (a fixed commit each), so they are the real code."""

from __future__ import annotations

import json
import time
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest

from pulsed.db.migrate import available_migrations, current_version, migrate
from tests.pg import create_database, drop_database, unique_name, wait_until
from tests.system.daemon import Daemon

REPO = Path(__file__).resolve().parents[2]
# The console branch before its merge: schema version 12, the last before 0013 (an
# ALTER TABLE of pulse_jobs) and 0014 (an index build on it).
SCHEMA_12 = "d276958950da0dd806774f0830ff067d09a66da0"


def old_tree(commit: str, into: Path) -> Path:
    """The `pulsed` package as it was at `commit`, in a folder of its own."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the older version comes from git history")
    probe = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"commit {commit[:10]} is not in this clone (a shallow clone?)")
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "pulsed"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def migrate_with(tree: Path, dsn: str) -> None:
    """Migrate as that tree's code does, in a process importing it alone."""
    code = ("import psycopg, pulsed.db.migrate as m; "
            f"c = psycopg.connect({dsn!r}, autocommit=True); m.migrate(c)")
    subprocess.run([sys.executable, "-c", code], cwd=tree, env={"PYTHONPATH": str(tree)},
                   check=True, capture_output=True, timeout=60)


@pytest.fixture
def schema_12(admin_dsn: str, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Version 12's code, and a database it migrated (to version 12)."""
    tree = old_tree(SCHEMA_12, tmp_path / "old-12")
    name = unique_name("pulse_upgrade")
    dsn = create_database(admin_dsn, name, template="template0")
    try:
        migrate_with(tree, dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert current_version(conn) == 12
        yield tree, dsn
    finally:
        drop_database(admin_dsn, name)


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_migration_waiting_behind_a_long_transaction_blocks_no_old_worker(
        schema_12: tuple[Path, str], tmp_path: Path, marks: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The new version migrates (0013 alters pulse_jobs) while the old
    version's daemon runs and an application holds a transaction on the
    table open (an enqueue not yet committed). The migration cannot have its
    lock until that transaction ends; while it waits, enqueues and the old
    workers' claims must go on (a lock request queued without a timeout
    made every one of them wait behind it, for as long as the application's
    transaction lasted)."""
    tree, dsn = schema_12
    old = Daemon(tmp_path / "old", dsn, node_id="old-1", workers=1,
                 env={"PYTHONPATH": f"{tree}:{REPO}"}).start(cwd=tree)
    try:
        old.wait_ready()
        with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as client:
            holder.execute("LOCK TABLE pulse_jobs IN ROW EXCLUSIVE MODE")  # as an INSERT takes
            holder_pid = holder.info.backend_pid
            caplog.set_level("WARNING", logger="pulsed.db.migrate")

            def upgrade() -> list[int]:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    return migrate(conn)
            thread, outcome = in_thread(upgrade)
            wait_until(lambda: client.execute(
                "SELECT 1 FROM pg_locks WHERE relation = 'pulse_jobs'::regclass AND NOT granted"
            ).fetchone(), timeout=10, message="the migration to wait for its lock on pulse_jobs")

            client.execute("SET statement_timeout = '8s'")
            payload = json.dumps({"dir": str(marks)})
            job = client.execute("INSERT INTO pulse_jobs (type, payload, state) "
                                 "VALUES ('noop', %s, 'available') RETURNING id",
                                 (payload,)).fetchone()[0]  # type: ignore[index]
            wait_until(lambda: client.execute("SELECT state = 'completed' FROM pulse_jobs "
                                              "WHERE id = %s", (job,)).fetchone()[0],
                       timeout=15, message=lambda: f"the old worker to run job {job}; log:\n"
                                                   f"{old.log_tail()}")
            assert thread.is_alive() and "error" not in outcome  # still waiting, not given up
            wait_until(lambda: f"pid {holder_pid}" in caplog.text, timeout=10,
                       message="the migration to say whose transaction it waits for")
            holder.rollback()

        thread.join(30)
        assert not thread.is_alive()
        assert outcome.get("result") == [m.version for m in available_migrations()
                                         if m.version > 12], outcome
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert current_version(conn) == available_migrations()[-1].version
            # The old worker goes on against the new schema.
            second = conn.execute("INSERT INTO pulse_jobs (type, payload, state) "
                                  "VALUES ('noop', %s, 'available') RETURNING id",
                                  (json.dumps({"dir": str(marks)}),)).fetchone()[0]  # type: ignore[index]
            wait_until(lambda: conn.execute("SELECT state = 'completed' FROM pulse_jobs "
                                            "WHERE id = %s", (second,)).fetchone()[0],
                       timeout=15, message=lambda: f"job {second}; log:\n{old.log_tail()}")
        assert "Traceback" not in old.log_text()
    finally:
        old.kill_all()


# The version before this one: schema 15 (node commands), the old
# pulse_claim_limited that 0016 replaced.
SCHEMA_15 = "a45a52470b80187ad18368468fa9d5fefec78f53"


@pytest.fixture
def schema_15_tree(tmp_path: Path) -> Path:
    return old_tree(SCHEMA_15, tmp_path / "old-15")


def test_old_and_new_schedulers_take_turns_leading(daemon_factory: Callable[..., Daemon],
                                                   conn: psycopg.Connection,
                                                   schema_15_tree: Path) -> None:
    """Upgrade order A: the new version migrated; an old and a new daemon run
    side by side, each with the same cron entry, and leadership moves from
    one version to the other as leaders are killed. Every tick is enqueued
    once, whoever leads, and each reads the other's status."""
    import os
    import signal

    from tests.system.test_scheduler_cluster import (CRON_ENTRY, CRON_NAME, daemon_for_holder,
                                                     live_leader, ticks_with_jobs_since,
                                                     with_cron)
    old_env = {"PYTHONPATH": f"{schema_15_tree}:{REPO}"}
    made = {"old": 0, "new": 0}

    def make(name: str) -> Daemon:
        made[name] += 1
        daemon = daemon_factory(f"{name}{made[name]}", node_id=f"node-{name}", workers=1,
                                env=old_env if name == "old" else None,
                                config={"types": {"noop": {"concurrency": 2}}})
        with_cron(daemon, [CRON_ENTRY])
        return daemon.start(cwd=schema_15_tree if name == "old" else None)

    daemons = {"old": make("old"), "new": make("new")}
    for daemon in daemons.values():
        daemon.wait_ready()
    versions_led: list[str] = []
    lead = wait_until(lambda: live_leader(conn), timeout=15, message="a first leader")
    for _ in range(3):
        leader_id, term = lead
        victim = daemon_for_holder(daemons, leader_id)
        assert victim is not None, f"no daemon holds the lease {leader_id}"
        versions_led.append(victim)
        since = time.time()
        wait_until(lambda: ticks_with_jobs_since(conn, since) >= 2, timeout=10,
                   message=f"ticks under the {victim} leader")
        # Each version reads the other's status over its control socket.
        for daemon in daemons.values():
            assert daemon.status()["leader"], daemon.status()
        os.killpg(daemons[victim].pid, signal.SIGKILL)
        lead = wait_until(lambda: (now := live_leader(conn)) and now[1] > term and now,
                          timeout=15, message=f"a leader after killing {leader_id}")
        daemons[victim] = make(victim)
        daemons[victim].wait_ready()
    assert set(versions_led) == {"old", "new"}, versions_led
    keys = conn.execute("SELECT idempotency_key, count(*) FROM pulse_jobs WHERE idempotency_key"
                        " LIKE %s GROUP BY 1 HAVING count(*) > 1",
                        (f"cron:{CRON_NAME}:%",)).fetchall()
    assert keys == []
    # The cron jobs, of a type with a cluster-wide limit, are run by both.
    wait_until(lambda: conn.execute("SELECT count(*) FROM pulse_jobs WHERE type = 'noop' AND"
                                    " state <> 'completed'").fetchone()[0] == 0
               or None, timeout=10, message="the cron jobs to be run")
    owners = {row[0].split("/")[0] for row in conn.execute(
        "SELECT DISTINCT lease_owner FROM pulse_jobs WHERE lease_owner IS NOT NULL")}
    assert {"node-old", "node-new"} <= owners, owners


def test_a_pulsed_older_than_the_schema_runs_and_says_so(daemon_factory: Callable[..., Daemon],
                                                         conn: psycopg.Connection,
                                                         marks: Path) -> None:
    """Upgrade order B, seen from this version as the old one: a newer
    pulsed migrated past this one's migrations. This one must not try to
    migrate backwards or refuse (the fleet would stop mid-deploy): it runs,
    and its log says the schema is newer, naming both versions."""
    newest = available_migrations()[-1]
    conn.execute("INSERT INTO pulse_migrations (version, name) VALUES (%s, 'from_the_future')",
                 (newest.version + 1,))
    daemon = daemon_factory("behind", workers=1).start()
    daemon.wait_ready()
    wanted = (f"schema is at version {newest.version + 1:04d}_from_the_future, newer than this "
              f"pulsed's {newest.version:04d}_{newest.name}")
    wait_until(lambda: wanted in daemon.log_text(), timeout=5,
               message=lambda: f"the warning; log:\n{daemon.log_tail()}")
    job = conn.execute("INSERT INTO pulse_jobs (type, payload, state) VALUES ('noop', %s,"
                       " 'available') RETURNING id",
                       (json.dumps({"dir": str(marks)}),)).fetchone()[0]  # type: ignore[index]
    wait_until(lambda: conn.execute("SELECT state = 'completed' FROM pulse_jobs WHERE id = %s",
                                    (job,)).fetchone()[0], timeout=15,
               message=lambda: f"job {job}; log:\n{daemon.log_tail()}")
