"""One running pulsed per node id.

Lease owner names, the process registry and the master's recovery of a
killed predecessor's leases are all keyed by `daemon.node_id`. Two daemons
with the same one (a copied config, a cloned VM) would take each other's
running jobs. Each master start claims its node id in
`pulse_node_instances` with a random instance id; the scheduler heartbeats
the row; a clean stop deletes it. A start refuses to run while the holder
is alive:

- on this host (same boot id and PID namespace, so its pid means
  something here): while its master pid is a live pulsed process. A master
  killed a moment ago is seen dead at once, so an immediate restart works;
- elsewhere: while its heartbeat is younger than NODE_STALE_S.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from pulsed.db.connect import connect
from pulsed.db.store import Store
from pulsed.errors import NodeInUse

log = logging.getLogger(__name__)

NODE_STALE_S = 30.0  # a holder on another host silent this long is gone
INSTANCE_BYTES = 8


@dataclass(frozen=True)
class NodeClaim:
    """This master start's hold on its node id."""

    node_id: str
    instance: str
    host: str
    previous: dict[str, Any] | None  # the row taken over (a dead holder), if any

    def previous_on_this_host(self) -> bool:
        """Are the previous holder's pids (in its lease owner names) pids
        of this host? Only then can they be checked for life here."""
        return self.previous is None or self.previous["host"] == self.host


def host_identity() -> str:
    """Where a pid means one process: this boot of this machine, this PID
    namespace (containers on one host share the boot id, not the pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{boot}/pidns:{pidns}"


def worker_owner(node_id: str, index: int, pid: int) -> str:
    """The lease owner name of a worker: the worker claims by it, the master
    releases a dead worker's leases by it (owner_alive reads the pid back)."""
    return f"{node_id}/worker-{index}/{pid}"


def pulsed_alive(pid: int, title: str = "pulsed") -> bool:
    """Is pid a live process whose title starts with `title` (a pulsed
    process names itself so; a reused pid names something else)? A master
    not titled yet is known by its command (`pulsed …`, `python -m pulsed …`)."""
    if pid == os.getpid():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    if " ".join(argv).startswith(title):
        return True
    return title == "pulsed" and _runs_pulsed(argv)


def _runs_pulsed(argv: list[str]) -> bool:
    programs = [os.path.basename(arg) for arg in argv[:2]]
    return "pulsed" in programs or any(argv[i:i + 2] == ["-m", "pulsed"]
                                       for i in range(min(len(argv), 4)))


def claim_node(conn: psycopg.Connection, node_id: str, *, master_pid: int,
               host: str | None = None) -> NodeClaim:
    """Hold node_id for this start, or raise NodeInUse naming the holder."""
    host = host or host_identity()
    instance = secrets.token_hex(INSTANCE_BYTES)
    store = Store(conn)
    with conn.transaction():
        holder = store.node_instance_get(node_id)
        if holder is not None and _alive(holder, host):
            raise NodeInUse(_in_use_message(node_id, holder, host))
        store.node_instance_claim(node_id, instance, host, master_pid)
    if holder is not None:
        log.info("node id %s: taking over from a pulsed that is gone (pid %d, instance %s)",
                 node_id, holder["master_pid"], holder["instance"])
    return NodeClaim(node_id, instance, host, holder)


def _alive(holder: dict[str, Any], host: str) -> bool:
    if holder["host"] == host:
        return pulsed_alive(holder["master_pid"])
    return holder["heartbeat_age_s"] < NODE_STALE_S


def _in_use_message(node_id: str, holder: dict[str, Any], host: str) -> str:
    where = ("on this host" if holder["host"] == host
             else f"on another host (heartbeat {holder['heartbeat_age_s']:.0f}s ago)")
    return (f"node id {node_id!r} is in use by another pulsed {where}, master pid "
            f"{holder['master_pid']}, started {holder['started_at']:%Y-%m-%d %H:%M:%S %Z}: "
            f"give each pulsed its own daemon.node_id (a copied config or a cloned machine "
            f"shares it); a daemon elsewhere that is gone frees it after {NODE_STALE_S:.0f}s")


def release_node(dsn: str, claim: NodeClaim) -> None:
    """A clean stop: the next start on this node id needs no check."""
    try:
        with connect(dsn, "node") as conn:
            Store(conn).node_instance_release(claim.node_id, claim.instance)
    except psycopg.Error as exc:
        log.warning("could not release node id %s (%s); the next start checks it", claim.node_id,
                    exc)
