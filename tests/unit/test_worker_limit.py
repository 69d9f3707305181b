"""`workers` has one limit (pulsed.board.MAX_WORKERS), refused everywhere
with an error naming it, never clamped: the config, `scale` on the control
protocol, and the master that runs them (pulsectl: tests/integration/
test_pulsectl.py)."""

from __future__ import annotations

import pytest

from pulsed.board import MAX_SLOTS, MAX_WORKERS
from pulsed.config import parse_config
from pulsed.control.protocol import (INVALID_ARGUMENT, ControlError, resolve_workers,
                                     validate_request)
from pulsed.errors import ConfigError

LIMIT_NAMED = "the most worker processes one pulsed runs"


def test_the_limit_fits_two_generations_on_the_board():
    # a reload runs two generations of workers side by side on the board
    assert 2 * MAX_WORKERS < MAX_SLOTS


def test_the_master_refuses_a_scale_past_the_limit():
    import os

    from pulsed.master import Master
    master = Master(parse_config({}, env={}), "postgresql:///none")
    try:
        with pytest.raises(ControlError, match=LIMIT_NAMED):
            master.scale(f"+{MAX_WORKERS}")
        assert master.scale(str(MAX_WORKERS)) == {"workers": MAX_WORKERS}
    finally:
        master.selector.close()
        master.board.close()
        os.close(master._signal_r)
        os.close(master._signal_w)


def test_config_accepts_the_limit():
    assert parse_config({"daemon": {"workers": MAX_WORKERS}}, env={}).daemon.workers == MAX_WORKERS


@pytest.mark.parametrize("source", ["file", "env"])
def test_config_refuses_workers_above_the_limit(source):
    data, env = ({"daemon": {"workers": MAX_WORKERS + 1}}, {}) if source == "file" else \
        ({}, {"PULSE_DAEMON_WORKERS": str(MAX_WORKERS + 1)})
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env)
    assert info.value.key in ("daemon.workers", "PULSE_DAEMON_WORKERS")
    assert f"between 0 and {MAX_WORKERS}" in str(info.value) and LIMIT_NAMED in str(info.value)


@pytest.mark.parametrize("workers", [MAX_WORKERS + 1, str(MAX_WORKERS + 1), 1024])
def test_scale_request_above_the_limit_is_refused(workers):
    with pytest.raises(ControlError) as info:
        validate_request({"cmd": "scale", "workers": workers})
    assert info.value.code == INVALID_ARGUMENT
    assert f"at most {MAX_WORKERS}" in info.value.message and LIMIT_NAMED in info.value.message


@pytest.mark.parametrize("workers", [MAX_WORKERS, str(MAX_WORKERS), "+1000", "-3"])
def test_scale_request_within_the_limit_or_relative_is_accepted(workers):
    assert validate_request({"cmd": "scale", "workers": workers}).args["workers"] == workers


def test_a_relative_scale_past_the_limit_is_refused_naming_it():
    assert resolve_workers("+2", MAX_WORKERS - 2) == MAX_WORKERS
    with pytest.raises(ControlError) as info:
        resolve_workers("+3", MAX_WORKERS - 2)
    assert f"0..{MAX_WORKERS}" in info.value.message and LIMIT_NAMED in info.value.message
