"""pulsectl's argument types: argparse reports their errors (exit status 2)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pulsed.board import MAX_WORKERS
from pulsed.config import parse_duration
from pulsed.control.protocol import MAX_LOG_LINES


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
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (seconds, or like "
                                         "30s, 5m, 1h)") from None


def log_lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LOG_LINES:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_LOG_LINES}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value
