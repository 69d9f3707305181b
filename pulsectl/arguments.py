"""pulsectl's argument types: argparse reports their errors (exit status 2)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pulsed.board import MAX_WORKERS
from pulsed.config import parse_duration
from pulsed.config_model import MAX_DURATION_S
from pulsed.control.protocol import MAX_LOG_LINES

MAX_BIGINT = 2**63 - 1
MIN_REFRESH_S, MAX_REFRESH_S = 0.1, 3600.0  # pulsectl top --interval


def workers_spec(text: str) -> str:
    name, equals, value = text.partition("=")
    value = value.strip()
    digits = value[1:] if value[:1] in "+-" else value
    if name.strip() == "workers" and equals and value == "auto":
        return value  # back to autoscaling (daemon.workers = "MIN..MAX")
    if name.strip() != "workers" or not equals or not digits.isdigit() or not digits.isascii():
        raise argparse.ArgumentTypeError(
            f"expected workers=N, workers=+N, workers=-N or workers=auto, got {text!r}")
    if value[:1] not in "+-" and int(value) > MAX_WORKERS:  # +N: the daemon checks the sum
        raise argparse.ArgumentTypeError(
            f"workers must be at most {MAX_WORKERS} (the most worker processes one pulsed "
            f"runs), got {value}")
    return value


def json_object(text: str) -> dict[str, Any]:
    if text == "-":
        text = sys.stdin.read()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), "
                                         f"got {type(value).__name__}")
    return value


def duration(text: str) -> float:
    """Seconds, at most 100 years (as every duration Pulse takes; a larger
    one reached the database and came back as "timestamp out of range")."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"not a duration of at most 100 years: {text!r} "
                                         "(seconds, or like 90s, 30m, 2h, 7d)")
    return seconds


def refresh_interval(text: str) -> float:
    seconds = duration(text)
    if not MIN_REFRESH_S <= seconds <= MAX_REFRESH_S:
        raise argparse.ArgumentTypeError(f"must be {MIN_REFRESH_S:g} to {MAX_REFRESH_S:g} "
                                         f"seconds, got {text!r}")
    return seconds


def log_lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LOG_LINES:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_LOG_LINES}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A job id or a count: 1 .. 2**63 - 1 (PostgreSQL's bigint)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BIGINT:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_BIGINT}, "
                                         f"got {text!r}")
    return value
