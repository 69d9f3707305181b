"""The leader's periodic duties, one module each.

Every duty has a `run_once(store, leadership)` that the scheduler loop and
the tests both call, and every write it makes is fenced by the leader term:
a deposed leader's duties change nothing. `interval` says how often the
loop runs it.
"""

from __future__ import annotations

from typing import Protocol

from pulsed.config import Config
from pulsed.db.store import Store
from pulsed.leadership import Leadership
from pulsed.maintenance.cron import CronEnqueuer
from pulsed.maintenance.promoter import Promoter
from pulsed.maintenance.pruner import Pruner, RegistryPruner
from pulsed.maintenance.reaper import Reaper
from pulsed.maintenance.rollup import StatsRollup
from pulsed.maintenance.vacuumer import Vacuumer


class Duty(Protocol):
    interval: float

    def run_once(self, store: Store, leadership: Leadership) -> int: ...


def leader_duties(config: Config, dsn: str) -> list[Duty]:
    """Every duty the leader runs, configured (dsn: for those that need a
    connection of their own)."""
    every = config.scheduler.interval
    return [
        Promoter(interval=every),
        Reaper(interval=every),
        CronEnqueuer(config.cron, interval=every),
        Pruner.from_config(config),
        RegistryPruner(),
        Vacuumer(dsn, config.scheduler.vacuum_dead_rows),
        StatsRollup(),  # the console's charts
    ]


__all__ = ["CronEnqueuer", "Duty", "Promoter", "Pruner", "Reaper", "RegistryPruner",
           "Vacuumer", "leader_duties"]
