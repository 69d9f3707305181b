"""The Store's node commands (migration 0015): one node's API asks another
node to drain or resume; that node's scheduler carries it out and
acknowledges. pulsed/node_commands.py drives both ends."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from pulsed.db.sql import queries
from pulsed.db.store_base import StoreBase


class NodeCommandQueries(StoreBase):
    # -- the asking side (the API) ------------------------------------------------

    def node_liveness(self, node_id: str) -> dict[str, Any] | None:
        """{heartbeat_age_s, has_master} of a registered node; None if unknown."""
        rows = self._rows("node_liveness", {"node_id": node_id})
        return rows[0] if rows else None

    def node_command_add(self, node_id: str, command: str, *, requested_by: str,
                         requested_from: str) -> int:
        """Record a request for `node_id` and NOTIFY it (at commit); its id."""
        return self._rows("node_command_add", {
            "node_id": node_id, "command": command, "requested_by": requested_by,
            "requested_from": requested_from})[0]["id"]

    def node_command_get(self, command_id: int) -> dict[str, Any] | None:
        rows = self._rows("node_command_get", {"id": command_id})
        return rows[0] if rows else None

    # -- the target node's scheduler -------------------------------------------------

    def node_commands_listen(self) -> None:
        self.conn.execute(queries()["node_commands_listen"])

    def node_commands_pending(self, node_id: str) -> list[dict[str, Any]]:
        return self._rows("node_commands_pending", {"node_id": node_id})

    def node_command_done(self, command_id: int, outcome: dict[str, Any]) -> bool:
        """Acknowledge; False if it already was (by an earlier scheduler)."""
        return bool(self._rows("node_command_done", {"id": command_id,
                                                     "outcome": Jsonb(outcome)}))

    def node_commands_prune(self, keep_s: float) -> None:
        self.conn.execute(queries()["node_commands_prune"], {"keep": keep_s})
