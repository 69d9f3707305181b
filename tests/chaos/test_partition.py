"""A network partition of one host. Two pulsed run in their own network
namespaces, each reaching a private PostgreSQL over its own veth pair (the
server listens on the two root-side veth addresses only; nothing leaves
this machine). Host A (the leader, with two long jobs running) is cut off
with `ip link set down`: its leases expire, host B takes leadership and
runs A's jobs; once the link is back, A's late completions (one sent while
cut off and delivered after, one sent after) are fenced by the lease
token, so nothing is completed twice by a fenced writer."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

import pulsed
from pulsed.db.store import Store
from tests.chaos.harness import done_marks, now_utc, query
from tests.pg import wait_until
from tests.system.daemon import REPO, Daemon, pid_alive

pytestmark = pytest.mark.timeout(180)

LEASE_TTL = 3
SHORT_JOB_S = 5.0  # A finishes it while cut off: its completion is sent into the void
LONG_JOB_S = 14.0  # A finishes it after the link is back


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Host:
    ns: str
    host_if: str  # the root namespace's end of the veth pair
    host_addr: str  # where the server listens for this host
    ns_addr: str


class Network:
    """Two namespaces, each joined to the root namespace by a veth pair."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        net = f"10.{random.randrange(150, 200)}.{random.randrange(256)}"
        self.hosts = {name: Host(f"pulse-chaos-{name}{tag}", f"pc{name}{tag}h",
                                 f"{net}.{base + 1}", f"{net}.{base + 2}")
                      for name, base in (("a", 0), ("b", 4))}
        self.subnet = f"{net}.0/29"

    def create(self) -> None:
        for host in self.hosts.values():
            peer = host.host_if[:-1] + "n"
            _ip("netns", "add", host.ns)
            _ip("link", "add", host.host_if, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", host.ns)
            _ip("addr", "add", f"{host.host_addr}/30", "dev", host.host_if)
            _ip("link", "set", host.host_if, "up")
            _ip("-n", host.ns, "addr", "add", f"{host.ns_addr}/30", "dev", peer)
            _ip("-n", host.ns, "link", "set", peer, "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")

    def cut(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].host_if, "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].host_if, "up")

    def destroy(self) -> None:
        for host in self.hosts.values():
            _ip("link", "del", host.host_if, check=False)
            _ip("netns", "del", host.ns, check=False)


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need the `ip` binary (iproute2), not found on PATH")
    probe = f"pulse-chaos-probe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: `ip netns add` exited "
                    f"{made.returncode}: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)
    net = Network()
    try:
        net.create()
    except subprocess.CalledProcessError as exc:
        net.destroy()
        pytest.skip(f"cannot set up veth pairs: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
    yield net
    net.destroy()


class NetnsDaemon(Daemon):
    """A pulsed started inside a network namespace (`ip netns exec`, which
    execs, so the pid is the master's). Its control socket is a path, so
    status() works from the root namespace."""

    netns = ""

    def start(self) -> "NetnsDaemon":
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "pulsed",
                 "--config", str(self.config_path)],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self


def _in(ns: str) -> type[NetnsDaemon]:
    return type(f"Daemon_{ns}", (NetnsDaemon,), {"netns": ns})


def _owner_node(owner: str | None) -> str | None:
    return owner.split("/", 1)[0] if owner else None


def test_partitioned_host_is_fenced_and_its_jobs_taken_over(network, private_pg, daemons_on,
                                                           marks, record):
    a, b = network.hosts["a"], network.hosts["b"]
    pg = private_pg({"listen_addresses": f"{a.host_addr},{b.host_addr}"}, migrate_db=False)
    hba = pg.server.data_dir / "pg_hba.conf"
    with hba.open("a") as file:
        file.write(f"\n# the chaos suite's network namespaces\nhost all all {network.subnet} trust\n")
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    pg.migrate()
    dsns = {name: f"postgresql://postgres@{h.host_addr}:5432/pulse"
            for name, h in network.hosts.items()}
    config = {"worker": {"lease_ttl": LEASE_TTL}}

    host_a = daemons_on(dsns["a"], "a", cls=_in(a.ns), workers=2, config=config).start()
    host_a.wait_ready()
    wait_until(lambda: host_a.status()["leader"]["is_me"], timeout=15,
               message=f"host A leading; log:\n{host_a.log_tail()}")
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        short = pulsed.enqueue(conn, "sleep_first", {"s": SHORT_JOB_S, "dir": str(marks)})
        long = pulsed.enqueue(conn, "sleep_first", {"s": LONG_JOB_S, "dir": str(marks)})
    jobs = [short, long]

    def owners() -> dict[int, str | None]:
        rows = query(pg.dsn, "SELECT id, lease_owner FROM pulse_jobs WHERE id = ANY(%s) "
                             "AND state = 'running'", (jobs,))
        return {i: _owner_node(o) for i, o in rows or []}

    wait_until(lambda: owners() == {short: "node-a", long: "node-a"}, timeout=15,
               message=f"host A running both jobs; log:\n{host_a.log_tail()}")
    host_b = daemons_on(dsns["b"], "b", cls=_in(b.ns), workers=2, config=config).start()
    host_b.wait_ready()

    network.cut("a")
    cut_at = now_utc()

    def completed_by_b() -> bool:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            records = [Store(conn).get_job(i) for i in jobs]
        return all(r.state.value == "completed" and _owner_node(r.lease_owner) == "node-b"
                   for r in records)

    wait_until(completed_by_b, timeout=30, interval=0.1,
               message=f"host B finishing A's jobs; B's log:\n{host_b.log_tail()}")
    took_over = query(pg.dsn, "SELECT min(finished_at) FROM pulse_jobs WHERE id = ANY(%s)",
                      (jobs,))[0][0]
    wait_until(lambda: list(marks.glob(f"{short}.1.*.done")), timeout=SHORT_JOB_S + 10,
               message="host A finishing the short job while cut off")
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        before_heal = {i: Store(conn).get_job(i) for i in jobs}
    network.heal("a")
    healed_at = now_utc()

    # A's two late completions arrive (one was in flight during the cut) and
    # are refused: the worker logs "lease lost before completion".
    def fenced() -> list[str]:
        lines = [line for line in host_a.log_text().splitlines() if "lease lost before completion" in line]
        return lines if all(any(f"#{i}" in line for line in lines) for i in jobs) else []

    refused = wait_until(fenced, timeout=LONG_JOB_S + 30, interval=0.2,
                         message=f"host A's late completions being fenced; A's log:\n"
                                 f"{host_a.log_tail()}")
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        after = {i: Store(conn).get_job(i) for i in jobs}
        claimed_while_cut = conn.execute(
            "SELECT count(*) FROM pulse_job_attempts WHERE starts_with(worker, 'node-a/') "
            "AND started_at > %s AND started_at < %s", (cut_at, healed_at)).fetchone()[0]
    a_runs = {i: len(list(marks.glob(f"{i}.1.*.done"))) for i in jobs}
    runs = done_marks(marks)
    fenced_completions = sum(1 for i in jobs if _owner_node(after[i].lease_owner) == "node-a")
    record(fault="network partition of one host (veth down) while it ran 2 jobs",
           load="2 long jobs on the cut-off host, 2 daemons x 2 workers, lease_ttl 3s",
           lost=sum(1 for i in jobs if after[i].state.value != "completed"),
           stuck=sum(1 for i in jobs if not after[i].state.is_finished),
           duplicates=sum(max(0, runs[i] - 1) for i in jobs),
           recovery_s=(took_over - cut_at).total_seconds(),
           completions_by_fenced_host=fenced_completions,
           handler_runs_on_cut_host=a_runs, fenced_refusals=len(refused),
           link_down_s=round((healed_at - cut_at).total_seconds(), 3),
           outcomes={i: [x.outcome for x in after[i].attempts] for i in jobs})

    for i in jobs:
        assert after[i].state.value == "completed" and after[i].attempt == 2, after[i]
        assert _owner_node(after[i].lease_owner) == "node-b", after[i].lease_owner
        assert after[i].finished_at == before_heal[i].finished_at, "a fenced write changed the job"
        outcomes = [(x.attempt, x.outcome, _owner_node(x.worker)) for x in after[i].attempts]
        assert outcomes == [(1, "lease_expired", "node-a"), (2, "completed", "node-b")], outcomes
    assert a_runs == {short: 1, long: 1}, "host A's handlers should have run to the end"
    assert claimed_while_cut == 0
    assert pid_alive(host_a.pid) and pid_alive(host_b.pid)
    # A is back in the cluster: it answers and follows B's leadership.
    wait_until(lambda: host_a.status()["leader"]["node_id"] == "node-b", timeout=20,
               message=f"host A seeing B as leader after the heal; log:\n{host_a.log_tail()}")
