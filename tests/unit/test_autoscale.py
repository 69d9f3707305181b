"""Autoscaling decisions with a fake clock: steps up on waiting jobs, down
slowly when idle, never flaps under a steady load, and obeys a pin."""

from __future__ import annotations

import pytest

from pulsed.config import WorkerRange, parse_config
from pulsed.errors import ConfigError
from pulsed.master.autoscale import SCALE_UP_WAIT_S, Autoscaler, Load


def scaler(**kwargs) -> Autoscaler:
    options = {"concurrency": 1, "cooldown": 10.0, "down_after": 60.0, **kwargs}
    return Autoscaler(2, 16, **options)


def run(scaler: Autoscaler, workers: int, load_of, seconds: float, step: float = 1.0):
    """Drive the scaler once a second; return the counts it chose."""
    counts, now = [], 0.0
    while now < seconds:
        decision = scaler.decide(now, workers, load_of(now, workers))
        if decision:
            scaler.changed(now, now, workers, decision[0], decision[1])
            workers = decision[0]
            counts.append(workers)
        now += step
    return workers, counts


def test_jobs_waiting_over_a_second_add_workers_at_most_doubling():
    decision = scaler().decide(0.0, 2, Load(backlog=50, oldest_wait_s=SCALE_UP_WAIT_S,
                                            running=2, capacity=2))
    assert decision and decision[0] == 4 and "50 job(s) waiting" in decision[1]


def test_a_short_wait_with_free_slots_adds_nobody():
    assert scaler().decide(0.0, 4, Load(3, 0.2, running=1, capacity=4)) is None


def test_a_load_step_up_then_down_changes_a_few_times_and_settles():
    def load(now: float, workers: int) -> Load:
        if now < 120:  # a burst: 12 workers' worth of work keeps arriving
            busy = min(workers, 12)
            backlog = max(0, 40 - 3 * workers)
            return Load(backlog, 2.0 if backlog else None, busy, workers)
        return Load(0, None, 1, workers)  # then a trickle

    workers, counts = run(scaler(), 2, load, 600)
    assert max(counts) >= 12 and workers == 2
    ups = [b for a, b in zip([2] + counts, counts) if b > a]
    assert len(ups) <= 4, counts  # doubling steps, not one at a time
    assert len(counts) <= 4 + 14, counts


def test_a_steady_load_does_not_flap():
    def steady(now: float, workers: int) -> Load:
        return Load(0, None, min(workers, 5), workers)  # 5 busy, none waiting
    _, counts = run(scaler(), 6, steady, 1800)
    assert counts == [5], counts  # one idle worker shed, then nothing for 30 minutes


def test_cooldown_holds_changes_apart():
    s = scaler(cooldown=10.0)
    busy = Load(100, 5.0, 2, 2)
    assert s.decide(0.0, 2, busy) == (4, "100 job(s) waiting, the oldest 5.0s")
    s.changed(0.0, 0.0, 2, 4, "x")
    assert s.decide(9.9, 4, busy) is None
    assert s.decide(10.0, 4, busy)[0] == 8


def test_a_pin_holds_until_auto():
    s = scaler()
    s.pinned = 3
    assert s.decide(0.0, 3, Load(100, 9.0, 3, 3)) is None
    s.pinned = None
    assert s.decide(0.0, 3, Load(100, 9.0, 3, 3))[0] == 6
    assert s.decide(0.0, 40, Load(0, None, 0, 40)) == (16, "outside 2..16")


def test_the_config_takes_a_range_and_names_bad_ones():
    config = parse_config({"daemon": {"workers": "2..16", "scale_cooldown": "5s"}}, env={})
    assert config.daemon.workers == 2 and config.daemon.autoscale == WorkerRange(2, 16)
    assert config.daemon.scale_cooldown == 5.0
    assert parse_config({"daemon": {"workers": 4}}, env={}).daemon.autoscale is None
    for bad in ("16..2", "2-16", "auto", "0..0"):
        with pytest.raises(ConfigError, match="daemon.workers"):
            parse_config({"daemon": {"workers": bad}}, env={})
