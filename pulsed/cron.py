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
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Iterator
from zoneinfo import ZoneInfo

if TYPE_CHECKING:  # pulsed.config validates schedules with this module's parser
    from pulsed.config import CronEntry

# The grammar, parsed here only (config validation and the scheduler both
# call CronExpression.parse): each comma-separated part is "*", N or N-M,
# with an optional step /S (not after a bare N: "5/10" means different
# things in different cron dialects).
_PART = re.compile(r"(?:\*|(\d+)(?:-(\d+))?)(?:/(\d+))?")
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31),
          ("month", 1, 12), ("day-of-week", 0, 7))  # 0 and 7 are Sunday
MINUTE = timedelta(minutes=1)


class CronSyntaxError(ValueError):
    """A schedule that is not a five-field cron expression; the message
    names the field and what it accepts."""


def _parse_field(text: str, name: str, low: int, high: int, expression: str) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        bounds = _part_bounds(part, low, high)
        if bounds is None:
            raise CronSyntaxError(f"bad {name} field {text!r} in {expression!r} (numbers "
                                  f"{low}-{high}, '*', ranges a-b, lists a,b, steps */n "
                                  "or a-b/n)")
        start, end, step = bounds
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _part_bounds(part: str, low: int, high: int) -> tuple[int, int, int] | None:
    """(start, end, step) of one part, None if it is malformed or out of range."""
    match = _PART.fullmatch(part)
    if match is None:
        return None
    start_text, end_text, step_text = match.groups()
    step = int(step_text) if step_text is not None else 1
    if step < 1 or (step_text is not None and start_text is not None and end_text is None):
        return None  # "*/0", and "5/10"
    if start_text is None:
        return low, high, step
    start = int(start_text)
    end = int(end_text) if end_text is not None else start
    if not low <= start <= end <= high:
        return None
    return start, end, step


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
    def parse(cls, expression: str) -> CronExpression:
        """The expression's sets; CronSyntaxError (a ValueError) naming
        what is wrong."""
        fields = expression.split()
        if len(fields) != len(FIELDS):
            raise CronSyntaxError(f"must have 5 fields (minute hour day-of-month month "
                                  f"day-of-week), got {len(fields)} in {expression!r}")
        sets = [_parse_field(text, name, low, high, expression)
                for text, (name, low, high) in zip(fields, FIELDS)]
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
