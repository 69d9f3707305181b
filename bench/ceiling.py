"""W3: the SQL ceiling. pgbench runs Pulse's own claim and completion
statements (job_claim and job_complete_many from pulsed/db/queries.sql, with
their parameters filled in) against Pulse's own schema, with no Python in
the loop.

pgbench's session gets the worker's CLAIM_SESSION settings (in the DSN's
options), as the worker's connection does; a snapshot of older code without them runs
claim_plan_settings in the claim's transaction instead, as it did. Each run: empty the Pulse tables, enqueue --jobs available no-op jobs,
ANALYZE + CHECKPOINT, then `pgbench -n -M prepared -c C -j min(C, 2)
-t N/(C*batch)`: the same drain W1 times, every client draining an equal
share. Variants:
  single     claim 1 job (one transaction), complete it (another)
  batch100   claim 100 (one transaction), complete them (another)
  batch100-1txn  complete the previous 100 and claim the next 100 in one
             transaction, as the worker's complete_and_claim does (one more
             script run per client writes the last completions)
  batch500-1txn  the same with 500 (worker.prefetch's default since the
             fourth session)
jobs/s = completed rows / pgbench's measured time (connections excluded).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from peers.pulse_load import fill
from peers.pulse_peer import reset
from pulsed.db import store
from pulsed.db.store import queries
from pulsed.jobs import DEFAULT_MAX_ATTEMPTS

PGBENCH = shutil.which("pgbench", path="/usr/lib/postgresql/15/bin") or shutil.which("pgbench") or "pgbench"
VARIANTS = {"single": (1, False), "batch100": (100, False), "batch100-1txn": (100, True),
            "batch500-1txn": (500, True)}
CLAIM_SESSION = getattr(store, "CLAIM_SESSION", None)  # None: older code, settings per claim
_PARAM = re.compile(r"%\((\w+)\)[sb](?=(::\w+\[\])?)")  # text (s) or binary (b)


def fill_params(sql: str, values: dict[str, str]) -> str:
    """Replace each %(name)s / %(name)b with values[name]; an unknown array parameter
    (per-type settings and the like) is empty, any other unknown one an error."""
    def one(m: re.Match) -> str:
        if m.group(1) in values:
            return values[m.group(1)]
        if m.group(2):
            return "'{}'"
        raise KeyError(f"no value for %({m.group(1)})s: update bench/ceiling.py")
    return _PARAM.sub(one, sql)


def script(batch: int, one_txn: bool) -> str:
    """The pgbench script, as the worker sends it: the claim (after its plan
    settings, when they are not the session's) in one transaction, the
    completion in another; with one_txn, the completion of the previous
    batch goes first in the claim's transaction."""
    claim = fill_params(queries()["job_claim"], {
        "queues": "NULL", "limit": str(batch), "owner": "'bench/pgbench'", "lease_ttl": "30",
        "aging": "60", "handled": "'{noop}'",  # [worker] defaults; a worker's handlers
        "attempts_by_type": "'{}'", "fallback_attempts": str(DEFAULT_MAX_ATTEMPTS)})
    claim = (f"WITH c AS (\n{claim}\n)\nSELECT coalesce(array_agg(id), '{{}}')::text AS ids, "
             f"coalesce(array_agg(lease_token), '{{}}')::text AS tokens FROM c\n\\gset\n")
    complete = fill_params(queries()["job_complete_many"], {"ids": ":ids", "tokens": ":tokens"}) + ";\n"
    settings = "" if CLAIM_SESSION else queries().get("claim_plan_settings", "SELECT 1") + ";\n"
    if one_txn:
        return f"BEGIN;\n{settings}{complete}{claim}COMMIT;\n"
    return f"BEGIN;\n{settings}{claim}COMMIT;\n{complete}"


def pgbench(dsn: str, path: Path, clients: int, per_client: int) -> dict[str, float]:
    out = subprocess.run([PGBENCH, "-n", "-M", "prepared", "-c", str(clients), "-D", "ids={}",
                          "-D", "tokens={}", "-j", str(min(clients, 2)), "-t", str(per_client),
                          "-f", str(path), dsn],
                         capture_output=True, text=True, check=True).stdout
    tps = float(re.search(r"^tps = ([\d.]+)", out, re.M).group(1))
    xacts = int(re.search(r"actually processed: (\d+)", out).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))
    return {"pgbench_tps": tps, "script_runs": xacts, "duration_s": xacts / tps,
            "latency_ms_avg": latency}


def _worker_session(dsn: str) -> str:
    """The DSN with the worker's session settings added to its own options
    (libpq ignores PGOPTIONS when the DSN has options of its own)."""
    if not CLAIM_SESSION:
        return dsn
    return make_conninfo(dsn, options=store.session_options(dsn, CLAIM_SESSION))


def run_one(dsn: str, variant: str, clients: int, jobs: int) -> dict:
    batch, one_txn = VARIANTS[variant]
    per_client = max(1, jobs // (clients * batch))
    reset(dsn)
    fill(dsn, per_client * clients * batch, 0)
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(script(batch, one_txn))
        f.flush()
        res = pgbench(dsn, Path(f.name), clients, per_client + one_txn)
    with psycopg.connect(dsn) as c:
        done = c.execute("SELECT count(*) FROM pulse_jobs WHERE state = 'completed'").fetchone()[0]
    return {"variant": variant, "clients": clients, "batch": batch, "jobs": per_client * clients * batch,
            "done": done, "jobs_per_s": done / res["duration_s"], **res}


def run(dsn: str, jobs: int, clients: list[int], variants: list[str]) -> list[dict]:
    started = time.time()
    runs = [run_one(dsn, v, c, jobs) for v in variants for c in clients]
    version = subprocess.run([PGBENCH, "--version"], capture_output=True, text=True).stdout.strip()
    return [r | {"pgbench": version, "started_at": started} for r in runs]
