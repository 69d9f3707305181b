"""Handlers the system tests' daemons import (daemon config: worker.handlers)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pulsed
from pulsed.worker import JobTimeout


def _mark(job: pulsed.Job, what: str) -> None:
    """Leave a file per event in payload['dir'], so tests can count runs."""
    folder = job.payload.get("dir")
    if folder:
        Path(folder, f"{job.id}.{job.attempt}.{os.getpid()}.{what}").touch()


@pulsed.handler("noop")
def noop(job: pulsed.Job) -> None:
    _mark(job, "done")


@pulsed.handler("sleep")
def sleep(job: pulsed.Job) -> None:
    _mark(job, "start")
    time.sleep(job.payload.get("s", 1.0))
    _mark(job, "done")


@pulsed.handler("sleep_first")
def sleep_first(job: pulsed.Job) -> None:
    """Long on the first attempt (to be killed), quick afterwards."""
    _mark(job, "start")
    if job.attempt == 1:
        time.sleep(job.payload.get("s", 60.0))
    _mark(job, "done")


@pulsed.handler("hang")
def hang(job: pulsed.Job) -> None:
    """Ignores its soft timeout, as a handler stuck in C code would."""
    _mark(job, "start")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            time.sleep(0.5)
        except JobTimeout:
            _mark(job, "ignored-timeout")


def _timed(job: pulsed.Job) -> None:
    """Sleep payload['s'] and leave '<id>.<attempt>.<pid>.span' holding the
    wall-clock start and end, so tests can measure overlap and start rates."""
    start = time.time()
    time.sleep(job.payload.get("s", 0.0))
    end = time.time()
    folder = job.payload.get("dir")
    if folder:
        Path(folder, f"{job.id}.{job.attempt}.{os.getpid()}.span").write_text(f"{start} {end}")


for _type in ("limited", "rated", "timed"):
    pulsed.handler(_type)(_timed)
