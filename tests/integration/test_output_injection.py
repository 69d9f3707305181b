"""Job data that would drive the operator's terminal: a handler raises with
ESC sequences (clear the screen, an OSC 8 link, an OSC 52 clipboard write),
a C1 CSI, a bidi override and a carriage return that overwrites the line;
an HTTP client enqueues a type with a bidi override. `pulsectl jobs`, `job`,
`status`, `top`, `logs` and `enqueue --wait` show all of it escaped (as
`ls -b` and systemctl do); --json keeps the text exact."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import psycopg
import pytest
from rich.console import Console

import pulsed
from pulsectl import top
from pulsed.db.store import Store
from pulsed.jobs import Job, JobState
from tests.integration.test_control_server import FakeTarget
from tests.integration.test_pulsectl import (Result, Run, config_file, ctl, daemon,  # noqa: F401
                                             dctl, run, target)

# what a terminal acts on: C0 but newline and tab, DEL, C1, bidi controls
TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f"
                               "\u202a-\u202e\u2066-\u2069]")
HOSTILE = ("boom\x1b[2J\x1b]52;c;ZXZpbA==\x1b\\\x1b]8;;https://evil.example/\x1b\\click"
           "\x1b]8;;\x1b\\ \x9b31m\u202edetelpmoc\rcompleted\x08")
SHOWN = "boom\\x1b[2J\\x1b]52;c;ZXZpbA==\\x1b\\"  # ESC shown as \x1b, the rest as text


def assert_no_controls(text: str) -> None:
    found = TERMINAL_CONTROLS.search(text)
    assert found is None, f"{found[0]!r} reached the terminal: {text!r}"


def _hostile(job: Job) -> Any:
    if job.payload.get("ok"):
        return {"note": "\x9b2J\u202eresult"}
    raise RuntimeError(HOSTILE)


def failed_hostile_job(dsn: str, conn: psycopg.Connection) -> int:
    """A real worker runs a handler that raises HOSTILE; the job fails."""
    registry = pulsed.HandlerRegistry()
    registry.register("t", _hostile)
    job_id = pulsed.enqueue(conn, "t", {"s": "\x9b\u202e\x7f"}, max_attempts=1,
                            idempotency_key="key\u202eyek")
    assert pulsed.run_worker(dsn, registry=registry) == 1
    record = Store(conn).get_job(job_id)
    assert record.state is JobState.FAILED and HOSTILE in record.last_error
    # what a running handler's job.progress(0.5, HOSTILE) leaves (written by the worker)
    conn.execute("UPDATE pulse_jobs SET progress = %s WHERE id = %s",
                 (json.dumps({"fraction": 0.5, "message": HOSTILE, "at": 1.0e9}), job_id))
    return job_id


def test_job_and_jobs_show_a_hostile_error_escaped(ctl: Run, dsn: str,
                                                  conn: psycopg.Connection) -> None:
    job_id = failed_hostile_job(dsn, conn)
    pulsed.enqueue(conn, "evil\u202edetelpmoc", queue="q\u2066x")  # types may hold bidi controls
    shown = ctl("job", str(job_id))
    assert shown.code == 0, shown.err
    assert_no_controls(shown.out)
    assert SHOWN in shown.out  # the text is there, escaped, not dropped
    assert "\\u202edetelpmoc\\rcompleted\\x08" in shown.out
    assert "key\\u202eyek" in shown.out and '"\\x9b\\u202e\\x7f"' in shown.out
    listed = ctl("jobs")
    assert listed.code == 0, listed.err
    assert_no_controls(listed.out)
    assert SHOWN in listed.out and "evil\\u202edetelpmoc" in listed.out
    # scripts get the text exact
    job = ctl("--json", "job", str(job_id)).json
    assert HOSTILE in job["last_error"] and HOSTILE in job["attempts"][0]["traceback"]
    assert job["progress"]["message"] == HOSTILE
    assert job["idempotency_key"] == "key\u202eyek"
    assert HOSTILE in ctl("--json", "jobs").json["jobs"][1]["last_error"]


def test_job_shows_a_hostile_result_escaped(ctl: Run, dsn: str,
                                            conn: psycopg.Connection) -> None:
    registry = pulsed.HandlerRegistry()
    registry.register("t", _hostile)
    job_id = pulsed.enqueue(conn, "t", {"ok": True})
    assert pulsed.run_worker(dsn, registry=registry) == 1
    shown = ctl("job", str(job_id))
    assert_no_controls(shown.out)
    assert '"\\x9b2J\\u202eresult"' in shown.out
    assert ctl("--json", "job", str(job_id)).json["result"] == {"note": "\x9b2J\u202eresult"}


def test_enqueue_wait_shows_a_hostile_error_escaped(ctl: Run, dsn: str,
                                                    conn: psycopg.Connection) -> None:
    job_id = failed_hostile_job(dsn, conn)
    conn.execute("UPDATE pulse_jobs SET idempotency_key = 'k' WHERE id = %s", (job_id,))
    # the same key: enqueue returns the failed job, and --wait reports its error
    waited = ctl("enqueue", "t", "--idempotency-key", "k", "--wait", "5")
    assert waited.code == 1
    assert_no_controls(waited.err)
    assert SHOWN in waited.err


def hostile_status() -> dict[str, Any]:
    from tests.integration.test_control_server import sample_status
    status = sample_status()
    busy = status["children"][1]
    busy.update(job_type="evil\u202etype", progress={"fraction": 0.5, "message": HOSTILE})
    status["children"][2]["error"] = HOSTILE
    status["queues"][0]["type"] = "evil\u202etype"
    status["paused_queues"] = ["q\u202eq"]
    status["unhandled_types"] = [{"type": "evil\u202etype", "count": 1}]
    return status


def test_status_shows_hostile_job_data_escaped(dctl: Run, target: FakeTarget) -> None:
    target.status_value = hostile_status()
    shown = dctl("status")
    assert shown.code == 0, shown.err
    assert_no_controls(shown.out)
    assert "evil\\u202etype#123" in shown.out and "boom\\x1b[2J" in shown.out
    assert dctl("--json", "status").json == target.status_value


def test_top_shows_hostile_job_data_escaped() -> None:
    view = top.TopView()
    view.status = hostile_status()
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(view.render(1.0))
    assert_no_controls(buffer.getvalue())
    assert "evil\\u202etype#123 50% boom\\x1b[2J" in buffer.getvalue()


# -- rich markup ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["[link=https://evil.example/]default[/link]",
                                  "[bold red]urgent", "emails[/b]"])
def test_queue_names_are_not_rich_markup(ctl: Run, name: str) -> None:
    """Paused queue names (any token holder pauses one over HTTP) were
    printed as markup: a link, a style, or a MarkupError traceback."""
    paused = ctl("queue", "pause", name)
    assert paused.code == 0, paused.err
    assert f"queue {name} paused" in paused.out
    listed = ctl("queue", "list")
    assert listed.code == 0, listed.err
    assert listed.out == f"paused queues: {name}\n"


def test_a_bulk_filter_is_not_rich_markup(ctl: Run, dsn: str, conn: psycopg.Connection) -> None:
    """An --error filter copied from a job's error ("[errno 2] ...") vanished from the reply."""
    shown = ctl("retry", "--error", "[errno 2] no such file", "--dry-run")
    assert shown.code == 0, shown.err
    assert "[errno 2] no such file" in shown.out


# -- pulsectl logs ----------------------------------------------------------------------


def test_logs_shows_a_childs_hostile_line_escaped(dctl: Run, target: FakeTarget) -> None:
    """A handler prints a payload (and the worker logs a job's error):
    ESC sequences drove the terminal, and a CR put a forged line over the
    "worker 1 |" prefix, one that seemed to come from the master."""
    import os
    import selectors

    from pulsed.logring import LogRing
    from pulsed.output import JobTaggedStream

    ring = LogRing(write_through=None)
    read_fd, write_fd = ring.pipe()
    child_end = os.dup(write_fd)
    selector = selectors.DefaultSelector()
    ring.watch(selector, read_fd, write_fd, "worker", 1)
    with os.fdopen(child_end, "w") as stderr:  # the worker's stderr, as a handler prints to it
        job = Job(id=7, type="t", queue="default", payload={}, priority=0, attempt=1,  # type: ignore[arg-type]
                  max_attempts=1, idempotency_key=None, created_at=None)
        print(f"got {HOSTILE}", file=JobTaggedStream(stderr, lambda: job))
        stderr.write("2026-12-05 00:00:00,000 ERROR   worker[9] pulsed.worker: job t#7 failed "
                     "for good: x\r2026-12-05 00:00:00,000 INFO    master[1] pulsed: fake\n")
    ring.read(read_fd)
    ring.drain()
    selector.close()
    target.logs = lambda role, index, lines, after: {  # type: ignore[attr-defined]
        "lines": [line._asdict() for line in ring.tail(role=role, index=index, lines=lines,
                                                         after=after)],
        "last_seq": ring.last_seq}
    shown = dctl("logs")
    assert shown.code == 0, shown.err
    assert_no_controls(shown.out)
    lines = shown.out.splitlines()
    assert all(line.startswith("worker 1 | ") for line in lines), lines
    assert "[t#7] got boom\\x1b[2J" in shown.out
    assert "failed for good: x\\r2026-12-05" in shown.out
    assert HOSTILE.split("\r")[0] in "".join(json.loads(l)["text"]
                                             for l in dctl("--json", "logs").out.splitlines())


# -- --json on a terminal -----------------------------------------------------------------


def test_json_output_escapes_what_json_dumps_leaves_raw(ctl: Run, dsn: str,
                                                        conn: psycopg.Connection) -> None:
    """json.dumps(ensure_ascii=False) escapes ESC but not DEL, the C1 CSI
    or a bidi override: `pulsectl --json job` wrote them to the terminal.
    As \\u escapes the JSON value is the same."""
    job_id = failed_hostile_job(dsn, conn)
    for argv in (["--json", "job", str(job_id)], ["--json", "jobs"]):
        shown = ctl(*argv)
        assert shown.code == 0, shown.err
        assert_no_controls(shown.out)
    job = ctl("--json", "job", str(job_id)).json
    assert HOSTILE in job["last_error"] and job["payload"] == {"s": "\x9b\u202e\x7f"}
    registry = pulsed.HandlerRegistry()
    registry.register("t", _hostile)
    # enqueue --wait prints a completed job's result as JSON
    import threading
    worker = threading.Thread(target=pulsed.run_worker, args=(dsn,),
                              kwargs={"registry": registry, "stop_when_idle": False,
                                      "max_jobs": 1}, daemon=True)
    worker.start()
    waited = ctl("enqueue", "t", '{"ok": true}', "--wait", "30")
    worker.join(timeout=30)
    assert waited.code == 0, waited.err
    assert_no_controls(waited.out)
    assert json.loads(waited.out) == {"note": "\x9b2J\u202eresult"}
