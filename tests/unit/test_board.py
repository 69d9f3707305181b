"""The status board: the per-job write a worker does reads back whole."""

from __future__ import annotations

import math

from pulsed.board import Board, ChildState


def test_job_write_changes_only_the_job_fields() -> None:
    board = Board(slots=2)
    board.reset(1, "worker", 1)
    writer = board.writer(1)
    writer.update(pid=4242, heartbeat=12.5, rss_bytes=1 << 20, message="hello")
    writer.job(ChildState.BUSY, 99, 100.0, 130.0, 5, "email")
    view = board.read(1)
    assert (view.pid, view.role, view.index, view.heartbeat, view.rss_bytes, view.message) == (
        4242, "worker", 1, 12.5, 1 << 20, "hello")
    assert (view.state, view.job_id, view.job_type, view.job_started, view.job_deadline,
            view.jobs_done) == (ChildState.BUSY, 99, "email", 100.0, 130.0, 5)
    writer.job(ChildState.BUSY, None, None, None, 6)
    view = board.read(1)
    assert (view.job_id, view.job_started, view.job_deadline, view.jobs_done) == (None, None, None, 6)
    writer.job(ChildState.BUSY, 100, 101.0, None, 6, "sms")
    writer.heartbeat()  # a whole-slot write after job writes keeps them
    view = board.read(1)
    assert (view.job_id, view.job_type, view.job_deadline) == (100, "sms", None)
    assert board.read(0).role == "" and not math.isnan(view.heartbeat)
    assert view.job_started == 101.0


def test_long_job_type_is_cut_to_its_field() -> None:
    board = Board(slots=1)
    board.reset(0, "worker", 0)
    board.writer(0).job(ChildState.BUSY, 1, 1.0, None, 0, "t" * 100)
    assert board.read(0).job_type == "t" * 64
