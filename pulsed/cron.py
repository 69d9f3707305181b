"""Cron schedules: when a [[cron]] entry's ticks fall.

Standard five-field expressions (minute hour day-of-month month day-of-week,
evaluated in the entry's `timezone`, UTC by default; day-of-week 0 and 7 are
Sunday; when both day fields are restricted a day matching either runs, as
in Vixie cron), and the interval form `every = "30s"`, whose ticks are
multiples of the interval since the Unix epoch, so every node computes the
same ticks.

Ticks are instants (UTC): the search walks real minutes and reads each as
local time. Daylight-saving days follow Vixie cron, which tells "fixed"
entries (both minute and hour fields are numbers, lists or ranges: "30 2 * *
*") from "wildcard" ones (minute or hour starts with "*": "*/15 * * * *",
"0 * * * *"):
- spring forward: a fixed entry whose local time falls in the skipped hour
  runs once, at the first minute after the jump (02:30 -> 03:00); a
  wildcard entry just goes on at its pace (the skipped minutes do not exist);
- fall back: a fixed entry whose local time is in the repeated hour runs
  once, on its first pass; a wildcard entry runs on both passes, since each
  is real time going by (an hourly job still runs every hour).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator
from zoneinfo import ZoneInfo

from pulsed.config import CronEntry

_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
MINUTE = timedelta(minutes=1)


def _parse_field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if body == "*":
            start, end = low, high
        elif "-" in body:
            start, end = (int(n) for n in body.split("-", 1))
        else:
            start = end = int(body)
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronExpression:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool
    # Vixie cron's MIN_STAR | HR_STAR: runs by the clock's pace, not at a fixed time
    wildcard: bool = False

    @classmethod
    def parse(cls, expression: str) -> "CronExpression":
        fields = expression.split()
        if len(fields) != 5:
            raise ValueError(f"a cron expression has 5 fields, got {expression!r}")
        sets = [_parse_field(f, lo, hi) for f, (lo, hi) in zip(fields, _RANGES)]
        weekdays = frozenset(d % 7 for d in sets[4])
        return cls(sets[0], sets[1], sets[2], sets[3], weekdays,
                   fields[2] != "*", fields[4] != "*",
                   wildcard=fields[0].startswith("*") or fields[1].startswith("*"))

    def matches(self, moment: datetime) -> bool:
        if moment.minute not in self.minutes or moment.hour not in self.hours \
                or moment.month not in self.months:
            return False
        day_ok = moment.day in self.days
        weekday_ok = (moment.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok


class Schedule:
    """The ticks of one cron entry."""

    def __init__(self, entry: CronEntry) -> None:
        self.entry = entry
        self.expression = CronExpression.parse(entry.schedule) if entry.schedule else None
        self.every = entry.every
        self.zone = ZoneInfo(entry.timezone)
        self._utc = entry.timezone in _UTC_NAMES  # no daylight saving: the fast path

    def is_tick(self, minute: datetime) -> bool:
        """Whether the UTC minute `minute` is a tick of the expression."""
        expression = self.expression
        assert expression is not None
        if self._utc:
            return expression.matches(minute)
        local = minute.astimezone(self.zone)
        if expression.matches(local):
            # astimezone() sets fold=1 on the second pass through a repeated time
            return not local.fold or expression.wildcard
        return not expression.wildcard and any(
            expression.matches(skipped) for skipped in self._skipped_before(minute, local))

    def _skipped_before(self, minute: datetime, local: datetime) -> Iterator[datetime]:
        """The local wall-clock minutes a spring-forward jump skipped right
        before `minute` (none on every other minute of the year)."""
        wall = local.replace(tzinfo=None)
        before = (minute - MINUTE).astimezone(self.zone).replace(tzinfo=None)
        skipped = before + MINUTE
        while skipped < wall:
            yield skipped
            skipped += MINUTE

    def latest_at_or_before(self, moment: datetime, *, horizon: timedelta) -> datetime | None:
        """The newest tick <= moment, looking back at most `horizon`."""
        if self.every:
            return _from_epoch(math.floor(moment.timestamp() / self.every) * self.every)
        moment = moment.astimezone(timezone.utc)
        minute = moment.replace(second=0, microsecond=0)
        oldest = moment - horizon
        while minute >= oldest:
            if self.is_tick(minute):
                return minute
            minute -= MINUTE
        return None

    def ticks_between(self, after: datetime, until: datetime, *, limit: int) -> Iterator[datetime]:
        """Ticks t with after < t <= until, oldest first, at most `limit`."""
        count = 0
        if self.every:
            index = math.floor(after.timestamp() / self.every) + 1
            while count < limit and index * self.every <= until.timestamp():
                yield _from_epoch(index * self.every)
                index += 1
                count += 1
            return
        after, until = after.astimezone(timezone.utc), until.astimezone(timezone.utc)
        minute = after.replace(second=0, microsecond=0) + MINUTE
        while count < limit and minute <= until:
            if self.is_tick(minute):
                yield minute
                count += 1
            minute += MINUTE


_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Zulu", "Zulu", "Etc/GMT",
                        "GMT", "Universal", "Etc/Universal"})


def _from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
