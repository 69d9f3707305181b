"""Drain and resume any node from any node (issue 19).

Nodes share only the database, so a request for another node travels
through it (migration 0015's pulse_node_commands):

- the asking side (the console's API, `request` and `wait_done`) checks the
  node is registered and heartbeating with a master, records the request
  with who asked (the token's name) and NOTIFYs the channel with the node's
  id, then waits a few seconds for the acknowledgement;
- the target node's scheduler (`NodeCommandInbox.run_once`, every loop) hears
  the NOTIFY, or finds the request on its fallback poll, asks its own master
  over the control socket exactly as `pulsectl drain` / `resume` there would,
  and acknowledges the row with the node's state after it (or the error).

A request is carried out once: only the node's one scheduler takes its rows
and acknowledges each with `done_at IS NULL` as the fence; drain and resume
are idempotent should a scheduler die between the two. A request the node
first sees after EXPIRE_S (it was down) is acknowledged as expired instead:
an operator's drain from an hour ago is not today's intent."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from pulsed.db.store import Store
from pulsed.errors import PulseError

log = logging.getLogger(__name__)

COMMANDS = ("drain", "resume")
CHANNEL = "pulse_node_commands"
POLL_S = 5.0  # the fallback when a NOTIFY is missed (a reconnect, a pooler without LISTEN)
EXPIRE_S = 60.0  # older when its node first sees it: acknowledged as expired, not carried out
KEEP_S = 3600.0  # requests are deleted this long after they were made
NODE_SILENT_S = 30.0  # as the console's cluster view: a node this silent is not asked
ACK_WAIT_S = 5.0  # the API waits this long for the acknowledgement, then answers "pending"
ACK_POLL_S = 0.05


class NodeRefused(PulseError):
    """The node cannot take a drain or resume request."""

    def __init__(self, status: int, message: str) -> None:
        # status: the HTTP status to answer (404 unknown, 409 silent or master-less)
        super().__init__(message)
        self.status = status


# -- the asking side -------------------------------------------------------------------

def request(store: Store, node_id: str, command: str, *, who: str, here: str) -> int:
    """Record `command` for `node_id` (asked by the token `who` on node
    `here`); its id. NodeRefused for an unknown (404) or silent or
    master-less (409) node."""
    if command not in COMMANDS:
        raise ValueError(f"unknown node command {command!r}; one of {', '.join(COMMANDS)}")
    liveness = store.node_liveness(node_id)
    if liveness is None:
        raise NodeRefused(404, f"no node {node_id[:100]!r} in the process registry")
    if liveness["heartbeat_age_s"] >= NODE_SILENT_S:
        raise NodeRefused(409, f"node {node_id[:100]!r} stopped heartbeating "
                               f"{liveness['heartbeat_age_s']:.0f}s ago: nobody there to "
                               f"{command}")
    if not liveness["has_master"]:
        raise NodeRefused(409, f"node {node_id[:100]!r} runs without a master (pulsed --role): "
                               f"{command} its workers where they run")
    command_id = store.node_command_add(node_id, command, requested_by=who, requested_from=here)
    log.info("node %s: %s asked by %s (command %d, for that node's scheduler)", node_id,
             command, who, command_id)
    return command_id


def wait_done(store: Store, command_id: int, timeout: float = ACK_WAIT_S, *,
              clock: Callable[[], float] = time.monotonic,
              pause: Callable[[float], None] = time.sleep) -> dict[str, Any] | None:
    """The request's outcome once its node acknowledged it, or None if it
    did not within `timeout` (it stays pending: the node may still do it)."""
    deadline = clock() + timeout
    while True:
        row = store.node_command_get(command_id)
        if row is not None and row["done_at"] is not None:
            return dict(row["outcome"])
        if clock() >= deadline:
            return None
        pause(ACK_POLL_S)


# -- the target node ---------------------------------------------------------------------

class NodeCommandInbox:
    """The scheduler's end: `connected()` after each new connection (LISTEN),
    `run_once()` every loop. `carry_out(command)` asks this node's master and
    returns its state after it ("draining", ...), raising on failure."""

    def __init__(self, node_id: str, carry_out: Callable[[str], str], *, listen: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node_id = node_id
        self.carry_out = carry_out
        self.listen = listen  # behind a transaction pooler LISTEN does not hold: poll only
        self.clock = clock
        self.next_poll = 0.0

    def connected(self, store: Store) -> None:
        """A new connection: LISTEN, and look at once (a NOTIFY sent while
        there was no connection is lost)."""
        if self.listen:
            store.node_commands_listen()
        self.next_poll = 0.0

    def run_once(self, store: Store) -> int:
        """Carry out this node's pending requests, if a NOTIFY named this
        node or the fallback poll is due; how many were acknowledged."""
        heard = self._heard(store.conn)
        now = self.clock()
        if not heard and now < self.next_poll:
            return 0
        if now >= self.next_poll:
            store.node_commands_prune(KEEP_S)
        self.next_poll = now + POLL_S
        done = 0
        for row in store.node_commands_pending(self.node_id):
            outcome = self._outcome(row)
            if store.node_command_done(row["id"], outcome):
                done += 1
        return done

    def _heard(self, conn: psycopg.Connection) -> bool:
        if not self.listen:
            return False
        return any(n.payload == self.node_id for n in conn.notifies(timeout=0)
                   if n.channel == CHANNEL)

    def _outcome(self, row: dict[str, Any]) -> dict[str, Any]:
        command, who, origin = row["command"], row["requested_by"], row["requested_from"]
        if row["age_s"] > EXPIRE_S:
            log.warning("%s asked by %s on node %s %.0fs ago (command %d): expired, not "
                        "carried out", command, who, origin, row["age_s"], row["id"])
            return {"error": f"expired: this node saw it {row['age_s']:.0f}s after it was "
                             f"asked (over {EXPIRE_S:.0f}s)"}
        try:
            state = self.carry_out(command)
        except Exception as exc:  # noqa: BLE001 - acknowledged with the reason, logged
            log.error("%s asked by %s on node %s (command %d) failed: %s", command, who,
                      origin, row["id"], exc)
            return {"error": f"the master did not {command}: {exc}"}
        log.info("%s asked by %s on node %s (command %d): this node is %s", command, who,
                 origin, row["id"], state)
        return {"state": state}
