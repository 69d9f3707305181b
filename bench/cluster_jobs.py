"""Handlers for bench/cluster.py (worker.handlers = ["cluster_jobs"])."""

from __future__ import annotations

import time

import pulsed


@pulsed.handler("noop")
def noop(job: pulsed.Job) -> None:
    return None


@pulsed.handler("limited")
def limited(job: pulsed.Job) -> None:
    """[types.limited] concurrency = 3: held across every node?"""
    time.sleep(0.05)


@pulsed.handler("rated")
def rated(job: pulsed.Job) -> None:
    """[types.rated] rate = "20/s": held across every node?"""
    return None


@pulsed.handler("tick")
def tick(job: pulsed.Job) -> None:
    """The cron entry's job: every second, never doubled, never missed."""
    return None
