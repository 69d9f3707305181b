"""Unit tests for pulsed.cron: five-field expressions and the ticks of a schedule."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from pulsed.config import CronEntry, parse_config
from pulsed.cron import FIELDS, CronExpression, CronSyntaxError, Schedule
from pulsed.errors import ConfigError

UTC = timezone.utc
TWO_DAYS = timedelta(days=2)


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
       second: int = 0, microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


def cron(schedule: str, **kwargs) -> Schedule:
    return Schedule(CronEntry(name="test", type="noop", schedule=schedule, **kwargs))


def every(seconds: float) -> Schedule:
    return Schedule(CronEntry(name="test", type="noop", every=seconds))


# -- parsing -------------------------------------------------------------------------


def test_star_is_every_value_of_each_field():
    expr = CronExpression.parse("* * * * *")
    assert expr.minutes == frozenset(range(60))
    assert expr.hours == frozenset(range(24))
    assert expr.days == frozenset(range(1, 32))
    assert expr.months == frozenset(range(1, 13))
    assert expr.weekdays == frozenset(range(7))
    assert not expr.days_restricted and not expr.weekdays_restricted


@pytest.mark.parametrize("field, values", [
    ("*/15", {0, 15, 30, 45}),
    ("5", {5}),
    ("10-13", {10, 11, 12, 13}),
    ("10-20/5", {10, 15, 20}),
    ("1,2,59", {1, 2, 59}),
    ("0-10/5,30,50-52", {0, 5, 10, 30, 50, 51, 52}),
])
def test_minute_field_steps_ranges_and_lists(field, values):
    assert CronExpression.parse(f"{field} * * * *").minutes == frozenset(values)


def test_every_field_lands_in_its_own_slot():
    expr = CronExpression.parse("7 */6 1,15 2-4 1-5")
    assert expr.minutes == {7}
    assert expr.hours == {0, 6, 12, 18}
    assert expr.days == {1, 15}
    assert expr.months == {2, 3, 4}
    assert expr.weekdays == {1, 2, 3, 4, 5}
    assert expr.days_restricted and expr.weekdays_restricted


@pytest.mark.parametrize("weekday_field", ["0", "7"])
def test_day_of_week_0_and_7_are_both_sunday(weekday_field):
    expr = CronExpression.parse(f"0 0 * * {weekday_field}")
    assert expr.weekdays == {0}
    assert expr.matches(at(2024, 6, 2))  # a Sunday
    assert not expr.matches(at(2024, 6, 3))  # a Monday
    assert not expr.matches(at(2024, 6, 1))  # a Saturday


def test_weekday_range_through_7_wraps_to_sunday():
    assert CronExpression.parse("0 0 * * 5-7").weekdays == {5, 6, 0}


@pytest.mark.parametrize("bad", ["", "* * * *", "* * * * * *", "0 3 * *"])
def test_an_expression_needs_exactly_five_fields(bad):
    with pytest.raises(ValueError, match="5 fields"):
        CronExpression.parse(bad)


# -- matches() -----------------------------------------------------------------------


def test_matches_checks_minute_hour_and_month():
    expr = CronExpression.parse("30 3 * 6 *")
    assert expr.matches(at(2024, 6, 10, 3, 30))
    assert not expr.matches(at(2024, 6, 10, 3, 31))
    assert not expr.matches(at(2024, 6, 10, 4, 30))
    assert not expr.matches(at(2024, 7, 10, 3, 30))


def test_business_hours_every_quarter_hour():
    expr = CronExpression.parse("*/15 9-17 * * 1-5")
    assert expr.matches(at(2024, 6, 3, 9, 0))  # Monday 09:00
    assert expr.matches(at(2024, 6, 7, 17, 45))  # Friday 17:45
    assert not expr.matches(at(2024, 6, 3, 9, 10))  # not on the step
    assert not expr.matches(at(2024, 6, 3, 18, 0))  # after hours
    assert not expr.matches(at(2024, 6, 8, 10, 0))  # Saturday


def test_only_day_of_month_restricted_means_that_day_whatever_the_weekday():
    expr = CronExpression.parse("0 0 13 * *")
    assert expr.matches(at(2024, 9, 13))  # a Friday
    assert expr.matches(at(2024, 6, 13))  # a Thursday
    assert not expr.matches(at(2024, 9, 14))


def test_only_day_of_week_restricted_means_that_weekday_whatever_the_date():
    expr = CronExpression.parse("0 0 * * 5")
    assert expr.matches(at(2024, 9, 13))  # Friday the 13th
    assert expr.matches(at(2024, 9, 6))  # another Friday
    assert not expr.matches(at(2024, 9, 12))


def test_both_day_fields_restricted_means_either_matches():
    # Vixie cron: "the 13th, and every Friday", not "Friday the 13th".
    expr = CronExpression.parse("0 0 13 * 5")
    assert expr.matches(at(2024, 9, 13))  # Friday the 13th
    assert expr.matches(at(2024, 6, 13))  # Thursday the 13th
    assert expr.matches(at(2024, 9, 6))  # Friday the 6th
    assert not expr.matches(at(2024, 9, 12))  # Thursday the 12th


def test_matches_ignores_seconds():
    expr = CronExpression.parse("5 * * * *")
    assert expr.matches(at(2024, 1, 1, 0, 5, 59, 999_999))


# -- Schedule: five-field form -----------------------------------------------------------


def test_cron_latest_at_or_before_an_exact_tick_is_that_tick():
    assert cron("0 3 * * *").latest_at_or_before(at(2024, 1, 2, 3, 0), horizon=TWO_DAYS) \
        == at(2024, 1, 2, 3, 0)


def test_cron_latest_at_or_before_goes_back_to_the_previous_tick():
    schedule = cron("0 3 * * *")
    assert schedule.latest_at_or_before(at(2024, 1, 2, 2, 59, 59), horizon=TWO_DAYS) \
        == at(2024, 1, 1, 3, 0)
    assert schedule.latest_at_or_before(at(2024, 1, 2, 10, 17, 42), horizon=TWO_DAYS) \
        == at(2024, 1, 2, 3, 0)


def test_cron_latest_at_or_before_truncates_to_the_minute():
    tick = cron("* * * * *").latest_at_or_before(at(2024, 1, 1, 12, 34, 56, 789), horizon=TWO_DAYS)
    assert tick == at(2024, 1, 1, 12, 34)


def test_cron_latest_at_or_before_respects_the_horizon():
    yearly = cron("0 0 1 1 *")
    assert yearly.latest_at_or_before(at(2024, 6, 1), horizon=TWO_DAYS) is None
    assert yearly.latest_at_or_before(at(2024, 1, 2, 12), horizon=TWO_DAYS) == at(2024, 1, 1)


def test_cron_ticks_between_excludes_after_and_includes_until():
    schedule = cron("*/15 * * * *")
    ticks = list(schedule.ticks_between(at(2024, 1, 1, 10, 0), at(2024, 1, 1, 11, 0), limit=100))
    assert ticks == [at(2024, 1, 1, 10, 15), at(2024, 1, 1, 10, 30), at(2024, 1, 1, 10, 45),
                     at(2024, 1, 1, 11, 0)]


def test_cron_ticks_between_from_a_moment_inside_a_minute():
    ticks = list(cron("* * * * *").ticks_between(at(2024, 1, 1, 10, 0, 30),
                                                 at(2024, 1, 1, 10, 3, 10), limit=100))
    assert ticks == [at(2024, 1, 1, 10, 1), at(2024, 1, 1, 10, 2), at(2024, 1, 1, 10, 3)]


def test_cron_ticks_between_daily_over_days_and_the_limit():
    schedule = cron("0 3 * * *")
    after, until = at(2024, 1, 1, 3, 0), at(2024, 1, 4, 3, 30)
    assert list(schedule.ticks_between(after, until, limit=100)) == [
        at(2024, 1, 2, 3), at(2024, 1, 3, 3), at(2024, 1, 4, 3)]
    assert list(schedule.ticks_between(after, until, limit=2)) == [
        at(2024, 1, 2, 3), at(2024, 1, 3, 3)]


def test_cron_ticks_between_with_nothing_due_is_empty():
    assert list(cron("0 3 * * *").ticks_between(at(2024, 1, 1, 3), at(2024, 1, 2, 2, 59),
                                                limit=100)) == []


def test_cron_ticks_between_is_in_utc_whatever_the_offset_of_after():
    # The scheduler passes the last tick as read back from PostgreSQL, which
    # is in the session's TimeZone; the schedule is defined in UTC.
    plus_two = timezone(timedelta(hours=2))
    after = at(2024, 1, 1, 3, 0).astimezone(plus_two)
    ticks = list(cron("0 3 * * *").ticks_between(after, at(2024, 1, 3, 3, 30), limit=100))
    assert ticks == [at(2024, 1, 2, 3), at(2024, 1, 3, 3)]
    assert all(t.utcoffset() == timedelta(0) for t in ticks)


def test_cron_latest_at_or_before_is_in_utc_whatever_the_offset_of_moment():
    minus_five = timezone(timedelta(hours=-5))
    moment = at(2024, 1, 2, 10, 0).astimezone(minus_five)
    assert cron("0 3 * * *").latest_at_or_before(moment, horizon=TWO_DAYS) == at(2024, 1, 2, 3)


# -- Schedule: the interval form ---------------------------------------------------------


def test_every_ticks_are_multiples_of_the_interval_since_the_epoch():
    schedule = every(30)
    assert schedule.latest_at_or_before(at(2024, 1, 1, 0, 0, 45), horizon=TWO_DAYS) \
        == at(2024, 1, 1, 0, 0, 30)
    assert schedule.latest_at_or_before(at(2024, 1, 1, 0, 1, 0), horizon=TWO_DAYS) \
        == at(2024, 1, 1, 0, 1, 0)
    assert schedule.latest_at_or_before(at(2024, 1, 1, 0, 0, 59, 999_999), horizon=TWO_DAYS) \
        == at(2024, 1, 1, 0, 0, 30)


def test_every_latest_tick_is_the_same_on_every_node():
    # Each node computes the tick from its own clock; any moment within the
    # same interval gives the same tick, so they claim the same key.
    schedule = every(1)
    base = at(2024, 1, 1, 12, 0, 7)
    ticks = {schedule.latest_at_or_before(base + timedelta(milliseconds=ms), horizon=TWO_DAYS)
             for ms in (0, 1, 250, 999)}
    assert ticks == {base}


def test_every_ticks_between_excludes_after_and_includes_until():
    schedule = every(10)
    ticks = list(schedule.ticks_between(at(2024, 1, 1, 0, 0, 0), at(2024, 1, 1, 0, 0, 30),
                                        limit=100))
    assert ticks == [at(2024, 1, 1, 0, 0, 10), at(2024, 1, 1, 0, 0, 20), at(2024, 1, 1, 0, 0, 30)]


def test_every_ticks_between_from_off_tick_moments():
    ticks = list(every(10).ticks_between(at(2024, 1, 1, 0, 0, 5), at(2024, 1, 1, 0, 0, 29),
                                         limit=100))
    assert ticks == [at(2024, 1, 1, 0, 0, 10), at(2024, 1, 1, 0, 0, 20)]


def test_every_ticks_between_honours_the_limit():
    ticks = list(every(1).ticks_between(at(2024, 1, 1), at(2024, 1, 2), limit=3))
    assert ticks == [at(2024, 1, 1, 0, 0, 1), at(2024, 1, 1, 0, 0, 2), at(2024, 1, 1, 0, 0, 3)]


def test_every_with_a_fractional_interval():
    schedule = every(0.5)
    assert schedule.latest_at_or_before(at(2024, 1, 1, 0, 0, 1, 700_000), horizon=TWO_DAYS) \
        == at(2024, 1, 1, 0, 0, 1, 500_000)
    ticks = list(schedule.ticks_between(at(2024, 1, 1, 0, 0, 1), at(2024, 1, 1, 0, 0, 2),
                                        limit=100))
    assert ticks == [at(2024, 1, 1, 0, 0, 1, 500_000), at(2024, 1, 1, 0, 0, 2)]


def test_every_ticks_are_in_utc_and_chain_from_the_latest():
    schedule = every(60)
    latest = schedule.latest_at_or_before(at(2024, 1, 1, 10, 0, 30), horizon=TWO_DAYS)
    assert latest.utcoffset() == timedelta(0)
    following = list(schedule.ticks_between(latest, at(2024, 1, 1, 10, 2, 0), limit=100))
    assert following == [at(2024, 1, 1, 10, 1), at(2024, 1, 1, 10, 2)]


# -- time zones and daylight saving (issue 17) ----------------------------------------


def utc_ticks(schedule: str, zone: str, day: datetime) -> list[str]:
    """The ticks (as UTC hh:mm) from a day before `day` to two days after it."""
    found = cron(schedule, timezone=zone).ticks_between(
        day - timedelta(days=1), day + timedelta(days=2), limit=1000)
    return [tick.strftime("%m-%d %H:%M") for tick in found]


@pytest.mark.parametrize("schedule, zone, day, expected", [
    # Berlin springs forward on 2026-03-29, 02:00 CET -> 03:00 CEST: 02:30
    # does not exist, so it runs once at 03:00 CEST (01:00 UTC).
    ("30 2 * * *", "Europe/Berlin", at(2026, 3, 29),
     ["03-28 01:30", "03-29 01:00", "03-30 00:30"]),
    # Berlin falls back on 2026-10-25, 03:00 CEST -> 02:00 CET: 02:30 comes
    # twice (00:30 and 01:30 UTC) and runs on the first pass only.
    ("30 2 * * *", "Europe/Berlin", at(2026, 10, 25),
     ["10-24 00:30", "10-25 00:30", "10-26 01:30"]),
    # New York springs forward on 2026-03-08 at 02:00: 01:00 and 01:30 exist
    # (EST) as on any day; 02:30 does not and runs at 03:00 EDT.
    ("0 1 * * *", "America/New_York", at(2026, 3, 8),
     ["03-07 06:00", "03-08 06:00", "03-09 05:00"]),
    ("30 1 * * *", "America/New_York", at(2026, 3, 8),
     ["03-07 06:30", "03-08 06:30", "03-09 05:30"]),
    ("30 2 * * *", "America/New_York", at(2026, 3, 8),
     ["03-07 07:30", "03-08 07:00", "03-09 06:30"]),
    # New York falls back on 2026-11-01 at 02:00 EDT -> 01:00 EST: 01:00 and
    # 01:30 come twice and run once, at the first (EDT) pass.
    ("0 1 * * *", "America/New_York", at(2026, 11, 1),
     ["10-31 05:00", "11-01 05:00", "11-02 06:00"]),
    ("30 1 * * *", "America/New_York", at(2026, 11, 1),
     ["10-31 05:30", "11-01 05:30", "11-02 06:30"]),
])
def test_a_fixed_time_runs_once_a_day_across_daylight_saving(schedule, zone, day, expected):
    assert utc_ticks(schedule, zone, day) == expected


def test_a_fixed_time_the_jump_skips_runs_once_even_when_the_next_minute_matches_too():
    ticks = utc_ticks("0,30 2,3 * * *", "Europe/Berlin", at(2026, 3, 29))
    assert [t for t in ticks if t.startswith("03-29")] == ["03-29 01:00", "03-29 01:30"]


def test_an_hourly_entry_keeps_its_pace_through_both_transitions():
    hourly = cron("0 * * * *", timezone="Europe/Berlin")
    spring = list(hourly.ticks_between(at(2026, 3, 28, 23), at(2026, 3, 29, 3), limit=100))
    autumn = list(hourly.ticks_between(at(2026, 10, 24, 23), at(2026, 10, 25, 3), limit=100))
    # every real hour once: 23 UTC is 00:00 CET; the skipped 02:00 is not made up
    assert spring == [at(2026, 3, 29, h) for h in (0, 1, 2, 3)]
    # the repeated 02:00 (00:00 and 01:00 UTC) runs on both passes
    assert autumn == [at(2026, 10, 25, h) for h in (0, 1, 2, 3)]


def test_the_latest_tick_is_found_in_local_time():
    nightly = cron("0 3 * * *", timezone="America/New_York")
    assert nightly.latest_at_or_before(at(2026, 7, 1, 12), horizon=TWO_DAYS) == \
        at(2026, 7, 1, 7)  # 03:00 EDT
    assert nightly.latest_at_or_before(at(2026, 1, 15, 12), horizon=TWO_DAYS) == \
        at(2026, 1, 15, 8)  # 03:00 EST


def test_utc_is_the_default_time_zone():
    assert cron("30 2 * * *").latest_at_or_before(at(2026, 3, 29, 12), horizon=TWO_DAYS) == \
        at(2026, 3, 29, 2, 30)


@pytest.mark.parametrize("schedule, zone", [
    ("30 2 * * *", "Europe/Berlin"),
    ("15 2 * * *", "Australia/Lord_Howe"),  # half-hour shifts: 02:15 skipped, 01:45 repeated
    ("45 1 * * *", "Australia/Lord_Howe"),
])
def test_a_daily_fixed_time_runs_once_on_every_local_day_of_a_year(schedule, zone):
    ticks = list(cron(schedule, timezone=zone).ticks_between(
        at(2025, 12, 31), at(2027, 1, 2), limit=1000))
    local_days = [tick.astimezone(ZoneInfo(zone)).date() for tick in ticks]
    year = [day for day in local_days if day.year == 2026]
    assert len(year) == len(set(year)) == 365


# -- one grammar: config validation uses this parser ----------------------------------


@pytest.mark.parametrize("bad", ["* * * *", "60 * * * *", "* 24 * * *", "*/0 * * * *",
                                 "5-1 * * * *", "5/10 * * * *", "1,,2 * * * *", "@daily"])
def test_config_refuses_a_schedule_with_the_parsers_own_error(bad):
    with pytest.raises(CronSyntaxError) as parsed:
        CronExpression.parse(bad)
    with pytest.raises(ConfigError) as configured:
        parse_config({"cron": [{"name": "n", "type": "t", "schedule": bad}]}, env={})
    assert configured.value.key == "cron[0].schedule"
    assert configured.value.problem == str(parsed.value)


@pytest.mark.parametrize(("text", "name"), [("60", "minute"), ("24", "hour"), ("0", "day-of-month"),
                                            ("13", "month"), ("8", "day-of-week")])
def test_an_out_of_range_number_names_its_field(text, name):
    fields = ["*"] * 5
    fields[[n for n, _, _ in FIELDS].index(name)] = text
    with pytest.raises(CronSyntaxError, match=f"bad {name} field"):
        CronExpression.parse(" ".join(fields))
