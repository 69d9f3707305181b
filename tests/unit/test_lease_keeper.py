"""The lease keeper's tick in a database outage."""

from __future__ import annotations

import psycopg

from pulsed.lease import LeaseKeeper
from pulsed.ledger import JobLedger


def test_the_workers_duties_run_on_a_tick_whose_renewals_failed() -> None:
    """Its renewals failed on every tick of an outage, and the worker's own
    duties after them never ran: a cancelled async task past its grace was
    not stopped in the process, so the master killed the whole worker."""
    keeper = LeaseKeeper(JobLedger(), lambda: None, 30)  # type: ignore[arg-type, return-value]
    ticks: list[int] = []
    keeper.on_tick = lambda: ticks.append(1)

    def database_down() -> None:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    keeper.renew_due = database_down  # type: ignore[method-assign]
    keeper.tick()  # logged, not raised
    assert ticks == [1]
