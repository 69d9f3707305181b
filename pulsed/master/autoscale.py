"""Autoscaling: `daemon.workers = "MIN..MAX"` lets the master choose the
worker count from the waiting backlog and how long jobs wait.

Pure, like the child table: `decide()` takes the time and the load and
returns a new count with its reason, or None. The rules, and why:

- Up when jobs wait: some are available and the oldest has waited
  SCALE_UP_WAIT_S or more (pickup latency is what users feel), or every
  slot is taken with a backlog behind it. The step covers the backlog (one
  worker per `concurrency` waiting jobs), at most doubling, within MAX.
- Down when nothing has waited for `scale_down_after` and some capacity sat
  idle all that time, by half the idle workers (at least one): patient, so
  a load that pauses between bursts does not shed the workers it will need,
  yet a burst's peak is shed in a few steps, not one worker a minute.
- After any change, nothing for `scale_cooldown`: a new worker needs a
  moment before the load reflects it (hysteresis against flapping).

An operator's `pulsectl scale workers=N` pins the count until
`pulsectl scale workers=auto`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCALE_UP_WAIT_S = 1.0  # the oldest available job waited this long: more workers
SNAPSHOT_STALE_S = 5.0  # an older snapshot (no scheduler) says nothing about the load


@dataclass(frozen=True)
class Load:
    """What the master sees of its work, once a tick."""

    backlog: int  # available jobs (from the scheduler's snapshot)
    oldest_wait_s: float | None  # the oldest available job's age; None: none waiting
    running: int  # jobs this node's workers run
    capacity: int  # workers x concurrency


@dataclass(frozen=True)
class Change:
    at: float  # the master's monotonic clock
    at_wall: float
    old: int
    new: int
    reason: str


class Autoscaler:
    def __init__(self, low: int, high: int, *, concurrency: int, cooldown: float,
                 down_after: float) -> None:
        self.low, self.high = low, high
        self.concurrency = concurrency
        self.cooldown = cooldown
        self.down_after = down_after
        self.pinned: int | None = None  # an operator's count, until `scale workers=auto`
        self.last_change: Change | None = None
        self._quiet_since: float | None = None  # no job waiting, some capacity idle

    def decide(self, now: float, current: int, load: Load) -> tuple[int, str] | None:
        """The new worker count and why, or None to keep `current`."""
        if self.pinned is not None:
            return None
        if not self.low <= current <= self.high:
            target = min(max(current, self.low), self.high)
            return target, f"outside {self.low}..{self.high}"
        waiting = load.backlog > 0 and (
            (load.oldest_wait_s or 0.0) >= SCALE_UP_WAIT_S or load.running >= load.capacity)
        idle = load.backlog == 0 and load.running < load.capacity
        if not idle:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        if self._cooling(now):
            return None
        if waiting and current < self.high:
            wanted = current + math.ceil(load.backlog / max(1, self.concurrency))
            target = min(self.high, wanted, max(current * 2, current + 1))
            wait = f"{load.oldest_wait_s:.1f}s" if load.oldest_wait_s is not None else "?"
            return target, f"{load.backlog} job(s) waiting, the oldest {wait}"
        quiet = now - self._quiet_since if self._quiet_since is not None else 0.0
        if idle and current > self.low and quiet >= self.down_after:
            self._quiet_since = now
            idle_workers = (load.capacity - load.running) // max(1, self.concurrency)
            target = max(self.low, current - max(1, idle_workers // 2))
            return target, (f"no job waited for {self.down_after:g}s "
                            f"({load.running} of {load.capacity} slots busy)")
        return None

    def changed(self, now: float, wall: float, old: int, new: int, reason: str) -> None:
        self.last_change = Change(now, wall, old, new, reason)

    def _cooling(self, now: float) -> bool:
        return self.last_change is not None and now - self.last_change.at < self.cooldown

    def report(self) -> dict[str, Any]:
        """`master.autoscale` in status."""
        change = self.last_change
        return {"min": self.low, "max": self.high, "pinned": self.pinned,
                "last_change": None if change is None else {
                    "at": change.at_wall, "from": change.old, "to": change.new,
                    "reason": change.reason}}


def make_autoscaler(config: Any) -> Autoscaler | None:
    """The config's autoscaler, or None when daemon.workers is a number."""
    bounds = config.daemon.autoscale
    if bounds is None:
        return None
    return Autoscaler(bounds.low, bounds.high, concurrency=config.worker.concurrency,
                      cooldown=config.daemon.scale_cooldown,
                      down_after=config.daemon.scale_down_after)


def load_from(snapshot: dict[str, Any], wall_now: float, running: int,
              capacity: int) -> Load | None:
    """The load, from the scheduler's snapshot (the waiting jobs) and the
    board (the running ones); None while the snapshot is stale."""
    if wall_now - snapshot.get("written_at", 0.0) > SNAPSHOT_STALE_S:
        return None
    backlog = sum(q.get("count", 0) for q in snapshot.get("queues", [])
                  if q.get("state") == "available")
    return Load(backlog, snapshot.get("oldest_available_age_s"), running, capacity)
