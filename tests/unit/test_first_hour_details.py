"""Issue 24, item 9: the small things a first hour with Pulse runs into,
each checked where it lives (the daemons' side is in
tests/system/test_first_hour_signals.py)."""

from __future__ import annotations

import io
import logging
import pwd
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from pulsed.db import embedded
from pulsed.dsn import redact
from pulsed.output import JobTaggedStream

ROOT_DIR = Path(__file__).resolve().parents[2]


def test_creating_the_system_user_is_logged(monkeypatch, caplog) -> None:
    made: list[list[str]] = []
    account = pwd.getpwuid(0)

    def getpwnam(name: str) -> pwd.struct_passwd:
        if not made:
            raise KeyError(name)
        return account

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        made.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(embedded.pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(embedded.subprocess, "run", run)
    with caplog.at_level(logging.INFO, logger=embedded.log.name):
        assert embedded._ensure_system_user("pulse-postgres") is account
    assert made and made[0][:2] == ["useradd", "--system"]
    assert "created system user 'pulse-postgres'" in caplog.text
    assert "useradd --system" in caplog.text


def test_an_existing_system_user_is_not_announced(monkeypatch, caplog) -> None:
    monkeypatch.setattr(embedded.pwd, "getpwnam", lambda name: pwd.getpwuid(0))
    with caplog.at_level(logging.INFO, logger=embedded.log.name):
        embedded._ensure_system_user("pulse-postgres")
    assert "created" not in caplog.text


@pytest.mark.parametrize("dsn, shown", [
    ("postgresql://pulse:s3cret@db:5432/pulse", "postgresql://pulse:***@db:5432/pulse"),
    ("postgresql://pulse@db/pulse", "postgresql://pulse@db/pulse"),
    ("host=db user=pulse password=s3cret dbname=pulse", "password=***"),
])
def test_a_dsn_is_shown_without_its_password(dsn: str, shown: str) -> None:
    assert shown in redact(dsn) and "s3cret" not in redact(dsn)


def _job(type_: str, id_: int) -> SimpleNamespace:
    return SimpleNamespace(type=type_, id=id_)


def test_printed_lines_name_the_running_job() -> None:
    sink = io.StringIO()
    current: list[SimpleNamespace | None] = [None]
    stream = JobTaggedStream(sink, lambda: current[0])
    stream.write("before\n")
    current[0] = _job("email", 7)
    stream.write("one\ntwo")
    stream.write(" still two\n")
    print("three", file=stream)
    current[0] = None
    stream.write("after\n")
    assert sink.getvalue() == ("before\n[email#7] one\n[email#7] two still two\n"
                               "[email#7] three\nafter\n")


def test_the_tagged_stream_is_still_the_stream() -> None:
    sink = io.StringIO()
    stream = JobTaggedStream(sink, lambda: None)
    assert stream.getvalue() == "" and stream.writable() and not stream.isatty()


def test_each_thread_prints_its_own_job(monkeypatch) -> None:
    from pulsed.worker_process import BoardStatus
    slot = SimpleNamespace(job_started=lambda *a: None, job_finished=lambda *a: None)
    status = BoardStatus(SimpleNamespace(slot=slot, current_job=None))
    sink = io.StringIO()
    stream = JobTaggedStream(sink, status.job_for_output)
    started = threading.Barrier(2)

    def run(job: SimpleNamespace) -> None:
        status.job_started(job, None)
        started.wait()
        stream.write(f"from {job.id}\n")
        started.wait()
        status.job_finished(job, 1)

    threads = [threading.Thread(target=run, args=(_job("t", n),)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(sink.getvalue().splitlines()) == ["[t#1] from 1", "[t#2] from 2"]
    stream.write("idle\n")
    assert sink.getvalue().endswith("\nidle\n")


def test_the_example_config_runs_no_cron_for_types_nothing_handles() -> None:
    from pulsed.config import load_config
    assert load_config(ROOT_DIR / "config" / "pulse.toml", env={}).cron == ()


def test_pulse_toml_is_ignored_by_git() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "pulse.toml"], cwd=ROOT_DIR)
    assert ignored.returncode == 0, "pulse.toml is not in .gitignore"


def test_a_job_finished_on_another_thread_no_longer_tags_its_starter() -> None:
    """An async job starts on the worker's thread and ends on the loop's."""
    from pulsed.worker_process import BoardStatus
    slot = SimpleNamespace(job_started=lambda *a: None, job_finished=lambda *a: None)
    status = BoardStatus(SimpleNamespace(slot=slot, current_job=None))
    job = _job("fetch", 3)
    status.job_started(job, None)
    assert status.job_for_output() is job
    finisher = threading.Thread(target=status.job_finished, args=(job, 1))
    finisher.start()
    finisher.join()
    assert status.job_for_output() is None
