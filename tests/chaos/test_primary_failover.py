"""A primary failover under load: a private primary streams to a private
standby; pulsed runs on a multi-host URL (`target_session_attrs=read-write`);
the primary is stopped with `-m immediate` and the standby promoted. Every
process must follow the new primary. With synchronous replication no job is
lost or stuck; with asynchronous replication what was lost is reported
(docs/scaling.md says which to choose)."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from pulsed.db.embedded import EmbeddedPostgres
from tests.chaos.conftest import PRIVATE_SETTINGS, PrivateServer
from tests.chaos.harness import (StatusWatch, account, accounting_fields, check_accounting,
                                 enqueue_load, first_completion_after, now_utc, query, settle,
                                 wait_progress)
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(240)

LEASE_TTL = 5
WORKERS = 3
STANDBY = "pulse_standby"
REPLICATION = {"wal_level": "replica", "max_wal_senders": "4", "wal_keep_size": "256MB",
               "hot_standby": "on"}


def start_standby(primary: PrivateServer, root: Path) -> EmbeddedPostgres:
    """pg_basebackup of the primary (-R: it streams from it), started."""
    standby = EmbeddedPostgres(root / "data", settings={**PRIVATE_SETTINGS, **REPLICATION})
    standby._prepare_data_dir()
    socket_dir = primary.server.socket_dir
    port = primary.admin_dsn().rsplit("port=", 1)[1]
    deadline = time.monotonic() + 60
    standby._run("pg_basebackup", [
        "-D", str(standby.data_dir), "-R", "-X", "stream", "-c", "fast",
        "-d", f"host={socket_dir} port={port} user=postgres application_name={STANDBY}"],
        deadline)
    standby.start(timeout=60)
    return standby


def multi_host_dsn(*servers: EmbeddedPostgres) -> str:
    hosts = ",".join(str(s.socket_dir) for s in servers)
    port = servers[0].dsn().rsplit("port=", 1)[1]
    ports = ",".join(port for _ in servers)
    return (f"postgresql://postgres@/pulse?host={hosts}&port={ports}"
            "&target_session_attrs=read-write")


def streaming(primary_dsn: str, sync: bool) -> bool:
    rows = query(primary_dsn, "SELECT sync_state FROM pg_stat_replication "
                              "WHERE application_name = %s AND state = 'streaming'", (STANDBY,))
    return bool(rows) and (rows[0][0] == "sync" if sync else True)


@pytest.mark.parametrize("sync", [True, pytest.param(False, id="async")])
def test_a_promoted_standby_takes_over(private_pg, daemons_on, marks, record, tmp_path, sync):
    primary = private_pg(settings=REPLICATION)  # asynchronous until the standby exists:
    standby = start_standby(primary, Path(tmp_path) / "standby")  # commits would wait for it
    try:
        if sync:
            with psycopg.connect(primary.dsn, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY}'")
                conn.execute("SELECT pg_reload_conf()")
        wait_until(lambda: streaming(primary.dsn, sync), timeout=30,
                   message="the standby never streamed")
        run_failover(primary, standby, daemons_on, marks, record, sync)
    finally:
        standby.stop(mode="immediate", timeout=20)


def run_failover(primary: PrivateServer, standby: EmbeddedPostgres, daemons_on, marks, record,
                 sync: bool) -> None:
    jobs = 1500
    ids = enqueue_load(primary.dsn, jobs, "work", s=0.004, dir=str(marks))
    dsn = multi_host_dsn(primary.server, standby)
    daemon = daemons_on(dsn, workers=WORKERS, config={
        "worker": {"lease_ttl": LEASE_TTL}, "scheduler": {"leader_ttl": 3}}).start()
    daemon.wait_ready()
    watch = StatusWatch(daemon)
    watch.start()
    wait_progress(primary.dsn, ids, jobs // 5, timeout=60,
                  message=f"a fifth done before the fault; log:\n{daemon.log_tail()}")

    fault = now_utc()
    primary.stop(mode="immediate")
    standby._pg_ctl(["promote"], time.monotonic() + 30)
    promoted = now_utc()
    new_dsn = standby.dsn()
    with psycopg.connect(new_dsn, autocommit=True) as conn:
        present = [r[0] for r in conn.execute("SELECT id FROM pulse_jobs WHERE id = ANY(%s)",
                                               (ids,))]
    missing_after_promotion = len(ids) - len(present)
    took = settle(new_dsn, present, timeout=60 + LEASE_TTL,
                  message=f"on the new primary; log:\n{daemon.log_tail()}")
    watch.stop()
    acc = account(new_dsn, present, marks)
    first = first_completion_after(new_dsn, present, promoted)  # on the new primary
    leader = query(new_dsn, "SELECT leader_id FROM pulse_leader WHERE expires_at > now()")
    record(fault_to_promotion_s=round((promoted - fault).total_seconds(), 3),
           fault=f"primary stopped -m immediate, standby promoted ({'sync' if sync else 'async'})",
           load=f"{jobs} jobs x 4 ms, {WORKERS} workers", recovery_s=first,
           drain_after_promotion_s=round(took, 3), restarts=watch.restarts,
           jobs_missing_after_promotion=missing_after_promotion, **accounting_fields(acc))

    assert first is not None and first < 30, "no completion on the new primary within 30 s"
    assert leader, "no live leader on the new primary"
    check_accounting(acc, "after the failover")  # none stuck, none lost among those it has
    if sync:
        assert missing_after_promotion == 0, "synchronous replication lost committed jobs"
