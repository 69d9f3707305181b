"""The status board: a worker's job table reads back whole, and only
started, unwritten jobs are in it."""

from __future__ import annotations

import math

from pulsed.board import MAX_SLOT_JOBS, Board, ChildState


def test_job_table_lists_started_jobs_until_their_outcome_is_written() -> None:
    board = Board(slots=2)
    board.reset(1, "worker", 1)
    writer = board.writer(1)
    writer.update(pid=4242, heartbeat=12.5, rss_bytes=1 << 20, message="hello")
    writer.job_started(99, "email", 100.0, 130.0)
    writer.job_started(100, "sms", 101.0, None)
    view = board.read(1)
    assert (view.pid, view.role, view.index, view.heartbeat, view.rss_bytes, view.message) == (
        4242, "worker", 1, 12.5, 1 << 20, "hello")
    assert view.state == ChildState.BUSY
    assert [e.job_id for e in view.running] == [99, 100]
    assert (view.job_id, view.job_type, view.job_started, view.job_deadline) == (
        99, "email", 100.0, 130.0)
    writer.job_finished(99, 5)
    view = board.read(1)
    assert [e.job_id for e in view.running] == [100] and view.jobs_done == 5
    assert [(e.job_id, e.running, e.deadline) for e in view.jobs] == [
        (99, False, None), (100, True, None)]
    writer.heartbeat()  # a fixed-part write after job writes keeps them
    writer.jobs_cleared([99])
    view = board.read(1)
    assert [e.job_id for e in view.jobs] == [100] and not math.isnan(view.heartbeat)
    writer.job_started(101, "t" * 100, 102.0, 140.0)  # reuses the freed row
    assert {e.job_id for e in board.read(1).jobs} == {100, 101}
    assert board.read(1).jobs[0].job_type == "t" * 40
    writer.jobs_cleared([100, 101])
    assert board.read(1).jobs == () and board.read(0).role == ""


def test_a_full_table_keeps_what_it_has_and_the_slot_stays_readable() -> None:
    board = Board(slots=1)
    board.reset(0, "worker", 0)
    writer = board.writer(0)
    for job_id in range(MAX_SLOT_JOBS + 5):
        writer.job_started(job_id, "x", 1.0, None)
    view = board.read(0)
    assert len(view.jobs) == MAX_SLOT_JOBS
    writer.jobs_cleared(list(range(MAX_SLOT_JOBS + 5)))
    assert board.read(0).jobs == ()


def test_reset_empties_the_table() -> None:
    board = Board(slots=1)
    board.reset(0, "worker", 1)
    board.writer(0).job_started(7, "email", 1.0, None)
    board.reset(0)
    assert board.read(0).jobs == () and board.read(0).role == ""


def test_a_worker_that_cannot_reach_the_database_is_counted_and_its_error_read() -> None:
    from pulsed.metrics import BoardCollector
    board = Board(slots=3)
    for slot, index in ((0, 1), (1, 2)):
        board.reset(slot, "worker", index)
        board.writer(slot).update(pid=100 + index, state=ChildState.IDLE)
    board.reset(2, "worker", 3)
    board.writer(2).update(pid=103, state=ChildState.BOOT_FAILED,
                           message="importing handlers: boom")
    board.writer(1).update(message="no database for 6s: too many clients already")

    assert [board.read(s).database_error for s in range(3)] == [
        "", "no database for 6s: too many clients already", ""]  # a boot error is not one
    families = {f.name: f for f in BoardCollector(board).collect()}
    assert families["pulse_workers_database_unreachable"].samples[0].value == 1
    board.writer(1).update(message="")  # reached it again
    families = {f.name: f for f in BoardCollector(board).collect()}
    assert families["pulse_workers_database_unreachable"].samples[0].value == 0
    board.close()


def test_the_masters_restart_count_survives_the_childs_own_writes() -> None:
    """The master writes restarts at reset (before fork); the child's
    updates of its other fields keep it (the scheduler reports it)."""
    board = Board(slots=1)
    board.reset(0, "worker", 2, restarts=3)
    writer = board.writer(0)
    writer.update(pid=77, rss_bytes=5 << 20, state=ChildState.IDLE)
    writer.job_started(1, "email", 1.0, None)
    writer.job_finished(1, 1)
    view = board.read(0)
    assert (view.restarts, view.pid, view.rss_bytes, view.jobs_done) == (3, 77, 5 << 20, 1)
    board.reset(0)
    assert board.read(0).restarts == 0


def test_a_view_decodes_the_table_as_it_was_read_not_as_it_is_now() -> None:
    """A view's jobs are decoded when first asked for (the master's tick
    wants only the running ones), from the copy its consistent read took:
    writes after the read do not show in it, whichever is asked first."""
    board = Board(slots=1)
    board.reset(0, "worker", 0)
    writer = board.writer(0)
    for job_id in range(1, 301):
        writer.job_started(job_id, "email", float(job_id), None)
        writer.job_finished(job_id, job_id)
    writer.job_started(301, "sms", 301.0, 999.0)
    first, second = board.read(0), board.read(0)
    writer.jobs_cleared(list(range(1, 302)))
    writer.job_started(302, "late", 302.0, None)
    assert [(e.job_id, e.job_type, e.deadline) for e in first.running] == [(301, "sms", 999.0)]
    assert len(first.jobs) == 301 and first.jobs[0] == (1, "email", 1.0, None, False)
    assert len(second.jobs) == 301 and [e.job_id for e in second.running] == [301]
    assert [e.job_id for e in board.read(0).jobs] == [302]
