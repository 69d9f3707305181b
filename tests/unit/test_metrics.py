"""Metrics: names, aggregation across forked processes, and a directory that
stays bounded as processes come and go."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
import shutil
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from prometheus_client import generate_latest, values
from prometheus_client.parser import text_string_to_metric_families

from pulsed import metrics
from pulsed.board import Board, ChildState
from pulsed import metrics_files, metrics_scrape
from pulsed.errors import CHILD_BOOT_ERROR, CHILD_RECYCLE
from tests.promtool import promtool_check


@pytest.fixture
def mp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A multiprocess directory for this test; the process leaves
    multiprocess mode again afterwards."""
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setattr(metrics, "_metrics", None)
    monkeypatch.setattr(metrics_files, "_pending", set())
    # setup_multiproc_dir sets the variable in os.environ itself: setenv
    # first, so monkeypatch restores it (unset) after the test, not leaving
    # later tests' /metrics reading this test's directory
    monkeypatch.setenv(metrics.ENV, "")
    monkeypatch.delenv(metrics.ENV)
    yield metrics.setup_multiproc_dir(tmp_path / "state")


def job(job_type: str = "email", *, attempt: int = 1, max_attempts: int = 5,
        waited: float = 2.0) -> SimpleNamespace:
    return SimpleNamespace(type=job_type, attempt=attempt, max_attempts=max_attempts,
                           run_at=datetime.now(timezone.utc) - timedelta(seconds=waited))


def in_child(work: Callable[[], None]) -> int:
    """Run work() in a forked process, wait for it; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


def scrape(**collectors: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    text = generate_latest(metrics.exposition_registry(**collectors)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (the
    job metrics' queue label, say, left out)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def db_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.db"))


def run_jobs(count: int, outcome: str = "completed", job_type: str = "email") -> Callable[[], None]:
    def work() -> None:
        for _ in range(count):
            metrics.job_finished(job(job_type), outcome, 0.02)
    return work


# -- names and labels ---------------------------------------------------------------


@pytest.mark.parametrize("outcome, state, expected", [
    ("completed", metrics._UNKNOWN, "completed"),
    ("snoozed", None, "snoozed"),
    ("timeout", "retryable", "timed_out"),
    ("error", "retryable", "retried"),
    ("error", "failed", "failed"),
    ("error", None, "lost"),
])
def test_outcome_labels(outcome, state, expected):
    assert metrics.outcome_label(outcome, state) == expected


def test_an_error_without_a_state_is_judged_by_the_attempts_left():
    assert metrics.outcome_label("error", job=job(attempt=1, max_attempts=3)) == "retried"
    assert metrics.outcome_label("error", job=job(attempt=3, max_attempts=3)) == "failed"


@pytest.mark.parametrize("code, kill_reason, expected", [
    (CHILD_RECYCLE, None, "recycle"), (CHILD_BOOT_ERROR, None, "boot_error"),
    (-9, None, "killed"), (1, None, "exited"), (-15, "timeout", "timeout"),
    (-9, "heartbeat", "heartbeat"),
])
def test_restart_reasons(code, kill_reason, expected):
    assert metrics.restart_reason(code, kill_reason) == expected


def test_exposition_names_follow_prometheus_conventions(mp_dir):
    board = Board(slots=4)
    board.reset(0, "worker", 1)
    board.writer(0).update(pid=os.getpid(), state=ChildState.BUSY)
    in_child(run_jobs(3))
    metrics.child_restarted("worker", "recycle")
    metrics.leases_released([{"type": "email"}], "worker_died")
    metrics.leases_reaped(2)
    metrics.jobs_poisoned(1)
    metrics.jobs_enqueued("email", "http")
    text = generate_latest(metrics.exposition_registry(board=board)).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == {
        "pulse_jobs": "counter", "pulse_jobs_enqueued": "counter",
        "pulse_job_duration_seconds": "histogram", "pulse_job_wait_seconds": "histogram",
        "pulse_child_restarts": "counter", "pulse_leases_released": "counter",
        "pulse_leases_reaped": "counter", "pulse_jobs_poisoned": "counter",
        "pulse_metrics_files": "gauge",
        "pulse_workers": "gauge", "pulse_workers_database_unreachable": "gauge",
        "pulse_build_info": "gauge",
        "process_cpu_seconds": "counter", "process_resident_memory_bytes": "gauge",
        "process_virtual_memory_bytes": "gauge", "process_start_time_seconds": "gauge",
        "process_open_fds": "gauge",
    }
    assert 'pulse_workers{state="busy"} 1.0' in text
    assert 'pulse_workers{state="idle"} 0.0' in text
    promtool_check(text)


def test_an_unreachable_database_is_a_gauge_not_a_failed_scrape(mp_dir):
    def connect() -> object:
        raise psycopg.OperationalError("connection refused")

    samples = scrape(connect=connect, node_id="n1")
    assert value(samples, "pulse_database_up") == 0.0


# -- aggregation across processes ----------------------------------------------------


def test_outcomes_from_many_processes_add_up(mp_dir):
    pids = [in_child(run_jobs(25)) for _ in range(4)]
    pids.append(in_child(run_jobs(10, "error", "sms")))
    before = scrape()
    assert value(before, "pulse_jobs_total", type="email", outcome="completed") == 100
    assert value(before, "pulse_jobs_total", type="sms", outcome="retried") == 10
    assert value(before, "pulse_job_duration_seconds_count", type="email") == 100
    assert value(before, "pulse_job_wait_seconds_bucket", type="email", le="5.0") == 100
    assert value(before, "pulse_job_wait_seconds_bucket", type="email", le="1.0") == 0
    for pid in pids:
        metrics.child_reaped(pid)
    after = scrape()
    assert {k: v for k, v in after.items() if k[0] != "pulse_metrics_files"} == \
        {k: v for k, v in before.items() if k[0] != "pulse_metrics_files"}
    assert value(after, "pulse_metrics_files") < value(before, "pulse_metrics_files")


def test_the_directory_stays_bounded_as_processes_recycle(mp_dir):
    for _ in range(150):
        metrics.child_reaped(in_child(run_jobs(10)))
    assert db_files(mp_dir) == ["counter_archive.db", "histogram_archive.db"]
    started = time.monotonic()
    samples = scrape()
    assert time.monotonic() - started < 1.0
    assert value(samples, "pulse_jobs_total", type="email", outcome="completed") == 1500
    assert value(samples, "pulse_job_duration_seconds_count", type="email") == 1500


def test_a_reap_during_a_scrape_waits_for_the_next_one(mp_dir):
    first = in_child(run_jobs(5))
    with metrics._locked(mp_dir, exclusive=False):  # a scrape in progress
        metrics.child_reaped(first)
        assert f"counter_{first}.db" in db_files(mp_dir)
    assert value(scrape(), "pulse_jobs_total", type="email", outcome="completed") == 5
    second = in_child(run_jobs(5))
    metrics.child_reaped(second)
    assert db_files(mp_dir) == ["counter_archive.db", "histogram_archive.db"]
    assert value(scrape(), "pulse_jobs_total", type="email", outcome="completed") == 10


def test_a_live_child_with_a_pending_pid_keeps_its_file(mp_dir):
    """A pid left pending and reused by a new child: that child's file is
    not folded away while it runs (it goes on counting in it)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        run_jobs(3)()
        os.read(read, 1)
        run_jobs(2)()
        os._exit(0)
    try:
        wait_for(lambda: (mp_dir / f"counter_{pid}.db").exists())
        metrics.child_reaped(pid)  # pending: it is our live child
        assert f"counter_{pid}.db" in db_files(mp_dir)
    finally:
        os.write(write, b"x")
        os.waitpid(pid, 0)
    metrics.child_reaped(pid)
    assert db_files(mp_dir) == ["counter_archive.db", "histogram_archive.db"]
    assert value(scrape(), "pulse_jobs_total", type="email", outcome="completed") == 5


def test_a_corrupt_file_is_dropped_without_breaking_scrapes(mp_dir):
    in_child(run_jobs(4))
    (mp_dir / "counter_99999999.db").write_bytes(b"\xff" * 64)
    assert value(scrape(), "pulse_jobs_total", type="email", outcome="completed") == 4
    metrics.child_reaped(99999999)
    assert "counter_99999999.db" not in db_files(mp_dir)


def test_the_master_counts_released_leases_as_job_outcomes(mp_dir):
    metrics.leases_released([{"id": 1, "type": "email"}, {"id": 2, "type": "sms"}],
                            "worker_died")
    metrics.leases_released([{"id": 3, "type": "email"}], "timeout")
    metrics.leases_released(4, "previous_master")
    samples = scrape()
    assert value(samples, "pulse_leases_released_total", reason="worker_died") == 2
    assert value(samples, "pulse_leases_released_total", reason="previous_master") == 4
    assert value(samples, "pulse_jobs_total", type="email", outcome="worker_died") == 1
    assert value(samples, "pulse_jobs_total", type="email", outcome="timed_out") == 1


def test_setup_empties_the_directory_and_switches_an_imported_client(tmp_path, mp_dir):
    (mp_dir / "counter_12345.db").write_bytes(b"old")
    path = metrics.setup_multiproc_dir(mp_dir.parent)
    assert path == mp_dir and list(mp_dir.iterdir()) == []
    assert os.environ[metrics.ENV] == str(mp_dir)
    assert values.ValueClass._multiprocess


def test_a_job_update_is_cheap(mp_dir):
    one = job()
    metrics.job_finished(one, "completed", 0.01)
    count = 20_000
    started = time.perf_counter()
    for _ in range(count):
        metrics.job_finished(one, "completed", 0.01)
    per_job = (time.perf_counter() - started) / count
    assert per_job < 100e-6, f"{per_job * 1e6:.1f} µs per job"


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- a batch of job reports counts as the same jobs one by one ----------------------


def test_jobs_finished_in_one_batch_equals_each_job_observed_alone(mp_dir: Path) -> None:
    durations = [0.0, 0.004, 0.005, 0.0051, 0.3, 7.0, 5000.0, 0.005]  # on, under, over bounds
    batch = [metrics.JobReport(job("batch"), "completed", d, ended_at=time.time())
             for d in durations]
    batch.append(metrics.JobReport(job("batch", attempt=5), "error", 0.01, ended_at=time.time()))

    def one_by_one() -> None:
        for report in batch:
            metrics.job_finished(SimpleNamespace(**{**vars(report.job), "type": "single"}),
                                 report.outcome, report.duration_s)

    in_child(lambda: metrics.jobs_finished(batch))
    in_child(one_by_one)
    samples = scrape()
    for name in ("pulse_job_duration_seconds_bucket", "pulse_job_duration_seconds_count",
                 "pulse_job_wait_seconds_count"):
        batched = {labels: v for (n, labels), v in samples.items()
                   if n == name and ("type", "batch") in labels}
        single = {tuple((k, "batch" if v == "single" else v) for k, v in labels): v
                  for (n, labels), v in samples.items() if n == name and ("type", "single") in labels}
        assert batched and batched == single, name
    assert value(samples, "pulse_job_duration_seconds_sum", type="batch") == pytest.approx(
        value(samples, "pulse_job_duration_seconds_sum", type="single"))
    assert value(samples, "pulse_jobs_total", type="batch", outcome="completed") == 8
    assert value(samples, "pulse_jobs_total", type="batch", outcome="failed") == 1
    assert value(samples, "pulse_job_duration_seconds_bucket", type="batch", le="0.005") == 4


def test_build_info_and_every_childs_process_metrics(mp_dir):
    """pulse_build_info carries the version; process_* come for the master
    and each child on the board, by pid, with role and index labels."""
    import pulsed

    board = Board(slots=4)
    child = os.fork()
    if child == 0:
        time.sleep(60)  # a stand-in child, killed below
        os._exit(0)
    try:
        board.reset(0, "worker", 3)
        board.writer(0).update(pid=child, state=ChildState.IDLE)
        found = scrape(board=board, master_pid=os.getpid())
        alone = value(found, "process_resident_memory_bytes", role="worker", index="3")
        board.reset(1, "worker", 3)  # a successor beside it (a restart): one series, added up
        board.writer(1).update(pid=child, state=ChildState.STARTING)
        text = generate_latest(metrics.exposition_registry(board=board)).decode()
        promtool_check(text)
        # The child's RSS moves a little between scrapes (it faults in the
        # pages it touches after the fork): two of it, not one, within 5%.
        both = value(samples_of(text), "process_resident_memory_bytes", role="worker", index="3")
        assert abs(both - 2 * alone) <= 0.05 * 2 * alone, (both, alone)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    assert value(found, "pulse_build_info", version=pulsed.__version__) == 1
    for role, index in (("master", "0"), ("worker", "3")):
        assert value(found, "process_resident_memory_bytes", role=role, index=index) > 0
        assert value(found, "process_start_time_seconds", role=role, index=index) > 1e9
    assert value(found, "process_cpu_seconds_total", role="master", index="0") > 0
    promtool_check(generate_latest(metrics.exposition_registry(
        board=board, master_pid=os.getpid())).decode())


def test_job_metrics_carry_the_queue_with_a_bounded_number_of_values(mp_dir, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_QUEUE_LABELS", 2)
    reports = [metrics.JobReport(SimpleNamespace(**vars(job()), queue=queue), "completed", 0.01,
                                 ended_at=time.time())
               for queue in ("default", "mail", "default", "q3", "q4")]
    metrics.jobs_finished(reports)
    found = scrape()
    counts = {dict(ls)["queue"]: v for (n, ls), v in found.items() if n == "pulse_jobs_total"}
    assert counts == {"default": 2, "mail": 1, metrics.OTHER_QUEUE: 2}
    assert value(found, "pulse_job_duration_seconds_count", queue="mail") == 1


def test_job_types_made_up_by_clients_are_a_bounded_number_of_label_values(mp_dir, monkeypatch):
    # 20,000 types posted over HTTP made 20,000 series: /metrics 1.4 MB
    monkeypatch.setattr(metrics, "MAX_TYPE_LABELS", 2)
    for job_type in ("email", "sms", "email", "t3", "t4"):
        metrics.jobs_enqueued(job_type, "http")
    metrics.jobs_finished([metrics.JobReport(SimpleNamespace(**{**vars(job()), "type": t}),
                                             "completed", 0.01, ended_at=time.time())
                           for t in ("email", "t5")])
    found = scrape()
    enqueued = {dict(ls)["type"]: v for (n, ls), v in found.items()
                if n == "pulse_jobs_enqueued_total"}
    assert enqueued == {"email": 2, "sms": 1, metrics.OTHER_TYPE: 2}
    finished = {dict(ls)["type"]: v for (n, ls), v in found.items() if n == "pulse_jobs_total"}
    assert finished == {"email": 1, metrics.OTHER_TYPE: 1}


def test_a_scrape_skips_a_metric_file_a_process_is_creating(mp_dir):
    """A process opening its file at the moment of a scrape leaves it empty
    for an instant (its header not yet written): the scrape goes on."""
    in_child(run_jobs(2))
    (mp_dir / "counter_424242.db").write_bytes(b"")
    assert value(scrape(), "pulse_jobs_total", outcome="completed") == 2


def test_the_database_gauges_name_the_types_with_most_jobs_and_sum_the_rest(monkeypatch):
    # 20,000 types no worker handles made 60,000 series of pulse_queue_depth & co.
    monkeypatch.setattr(metrics_scrape, "MAX_TYPE_LABELS", 2)
    rows = [{"type": t, "state": s, "count": n, "oldest_age_s": age}
            for t, s, n, age in (("big", "available", 50, 1.0), ("mid", "available", 20, 2.0),
                                 ("low", "available", 3, 9.0), ("low", "failed", 1, 4.0),
                                 ("tiny", "available", 2, 5.0))]
    got = {(r["type"], r["state"]): (r["count"], r["oldest_age_s"])
           for r in metrics_scrape._fewer_types(rows)}
    assert got == {("big", "available"): (50, 1.0), ("mid", "available"): (20, 2.0),
                   (metrics.OTHER_TYPE, "available"): (5, 9.0),
                   (metrics.OTHER_TYPE, "failed"): (1, 4.0)}
    assert len(metrics_scrape._fewer_types(rows[:2])) == 2  # under the bound: as they are


def test_prepare_is_a_warm_up_that_never_raises(mp_dir: Path, caplog) -> None:
    """The master calls it once the node is up, the scheduler between
    polls, an idle worker before it waits: a metrics directory gone must
    not end any of them."""
    shutil.rmtree(mp_dir)
    metrics.prepare()
    assert "could not set up this process's metrics yet" in caplog.text
