"""pulsectl end to end: job commands against a real database (the ``dsn``
fixture, named by a temporary pulse.toml), daemon commands against a real
ControlServer with a fake target, served on a thread."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pulsed.db.migrate import available_migrations
import tomli_w

from pulsectl.cli import main
from pulsed.board import MAX_WORKERS
from pulsed.config import load_config, render_default_config
from pulsed.control.server import ControlServer
from pulsed.db import store_operator
from tests.integration.test_control_server import FakeTarget, ServerLoop, sample_status
from tests.pg import create_database, drop_database, unique_name

JOB_KEYS = {"id", "type", "queue", "state", "priority", "attempt", "max_attempts", "payload",
            "run_at", "created_at", "finished_at", "idempotency_key", "last_error"}
ATTEMPT_KEYS = {"attempt", "worker", "started_at", "finished_at", "outcome", "error"}


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Result]


def write_config(path: Path, url: str, **extra: Any) -> Path:
    data = {"database": {"url": url}, "daemon": {"state_dir": str(path.parent / "state")},
            **extra}
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def config_file(dsn: str, tmp_path: Path) -> Path:
    return write_config(tmp_path / "pulse.toml", dsn,
                        types={"email": {"max_attempts": 5, "priority": 3}})


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """run(*argv): pulsectl's exit status and output."""
    def invoke(*argv: str) -> Result:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return Result(code, out, err)
    return invoke


@pytest.fixture
def ctl(run: Run, config_file: Path) -> Run:
    """run() with --config naming the test database."""
    return lambda *argv: run("--config", str(config_file), *argv)


def enqueue(ctl: Run, *argv: str) -> int:
    result = ctl("enqueue", *argv)
    assert result.code == 0, result.err
    return int(result.out)


# -- enqueue -----------------------------------------------------------------------------


def test_enqueue_prints_the_id_and_job_shows_it(ctl: Run) -> None:
    job_id = enqueue(ctl, "report", '{"day": "2024-06-01"}')
    job = ctl("--json", "job", str(job_id)).json
    assert JOB_KEYS | {"attempts"} <= set(job)
    assert job["id"] == job_id and job["type"] == "report" and job["queue"] == "default"
    assert job["state"] == "available" and job["priority"] == 0 and job["attempt"] == 0
    # No [types.report] max_attempts: the type's default, resolved at the first claim.
    assert job["max_attempts"] is None and job["payload"] == {"day": "2024-06-01"}
    assert job["attempts"] == [] and job["finished_at"] is None
    assert "T" in job["created_at"] and job["run_at"][-6] in "+-"  # ISO 8601 with offset


def test_enqueue_options(ctl: Run) -> None:
    job_id = enqueue(ctl, "report", "--priority", "-5", "--delay", "1h", "--queue", "slow",
                     "--idempotency-key", "report-1", "--max-attempts", "3")
    job = ctl("job", str(job_id), "--json").json
    assert job["state"] == "scheduled" and job["priority"] == -5 and job["queue"] == "slow"
    assert job["idempotency_key"] == "report-1" and job["max_attempts"] == 3
    assert job["payload"] == {}


def test_enqueue_takes_type_defaults_from_the_config(ctl: Run) -> None:
    job = ctl("job", str(enqueue(ctl, "email")), "--json").json
    assert (job["priority"], job["max_attempts"]) == (3, 5)
    job = ctl("job", str(enqueue(ctl, "email", "--priority", "0")), "--json").json
    assert job["priority"] == 0


def test_enqueue_idempotent_repeat_returns_the_same_id(ctl: Run) -> None:
    first = enqueue(ctl, "sync", "--idempotency-key", "k")
    assert enqueue(ctl, "sync", '{"other": 1}', "--idempotency-key", "k") == first
    assert len(ctl("--json", "jobs").json["jobs"]) == 1


def test_enqueue_unique_while_frees_the_key_once_the_job_is_cancelled(ctl: Run) -> None:
    options = ("--idempotency-key", "k", "--unique-while", "unfinished")
    first = enqueue(ctl, "sync", *options)
    assert enqueue(ctl, "sync", *options) == first
    assert "k (held while unfinished)" in ctl("job", str(first)).out
    assert ctl("cancel", str(first)).code == 0
    assert enqueue(ctl, "sync", *options) != first


def test_enqueue_unique_for_holds_the_key(ctl: Run) -> None:
    first = enqueue(ctl, "sync", "--idempotency-key", "k", "--unique-for", "1h")
    assert ctl("cancel", str(first)).code == 0
    assert enqueue(ctl, "sync", "--idempotency-key", "k", "--unique-for", "1h") == first


def test_enqueue_reads_the_payload_from_stdin(ctl: Run,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"to": "a@example.com"}'))
    job = ctl("job", str(enqueue(ctl, "email", "-")), "--json").json
    assert job["payload"] == {"to": "a@example.com"}


def test_enqueue_json_prints_the_job(ctl: Run) -> None:
    job = ctl("enqueue", "email", "--json").json
    assert JOB_KEYS <= set(job) and job["type"] == "email"


@pytest.mark.parametrize(("argv", "named"), [
    (["email", "{not json"], "PAYLOAD_JSON"),
    (["email", "[1, 2]"], "PAYLOAD_JSON"),
    (["email", '"text"'], "PAYLOAD_JSON"),
    (["email", "--priority", "99999"], "--priority"),
    (["email", "--priority", "high"], "--priority"),
    (["email", "--delay", "soon"], "--delay"),
    (["email", "--max-attempts", "0"], "--max-attempts"),
    (["email", "--queue", ""], "--queue"),
    (["email", "--idempotency-key", "x" * 300], "--idempotency-key"),
    (["", "{}"], "TYPE"),
    (["email", '{"nul": "a\\u0000b"}'], "PAYLOAD_JSON"),
    (["email\nERROR forged", "{}"], "TYPE"),
    (["email", "--queue", "q\r"], "--queue"),
    (["email", "--idempotency-key", "k\x1b[2J"], "--idempotency-key"),
    (["email", "--unique-while", "unfinished"], "--unique-while"),
    (["email", "--idempotency-key", "k", "--unique-while", "done"], "--unique-while"),
    (["email", "--idempotency-key", "k", "--unique-for", "0"], "--unique-for"),
    (["email", "--idempotency-key", "k", "--unique-for", "1h", "--unique-while",
      "unfinished"], "--unique-for"),
])
def test_enqueue_bad_input_is_a_usage_error_naming_it(ctl: Run, argv: list[str],
                                                      named: str) -> None:
    result = ctl("enqueue", *argv)
    assert result.code == 2
    assert named in result.err
    assert ctl("--json", "jobs").json["jobs"] == []


# -- jobs and job ---------------------------------------------------------------------------


def test_jobs_lists_newest_first_with_filters(ctl: Run) -> None:
    ids = [enqueue(ctl, kind) for kind in ("email", "report", "email")]
    assert ctl("cancel", str(ids[0])).code == 0
    listed = ctl("--json", "jobs").json["jobs"]
    assert [j["id"] for j in listed] == ids[::-1]
    assert all(JOB_KEYS <= set(j) and "attempts" not in j for j in listed)
    assert [j["id"] for j in ctl("jobs", "--json", "--type", "email").json["jobs"]] == \
        [ids[2], ids[0]]
    assert [j["id"] for j in ctl("jobs", "--json", "--state", "cancelled").json["jobs"]] == \
        [ids[0]]
    assert [j["id"] for j in ctl("jobs", "--json", "--limit", "1").json["jobs"]] == [ids[2]]


def test_jobs_table_for_people(ctl: Run) -> None:
    job_id = enqueue(ctl, "email")
    result = ctl("jobs")
    assert result.code == 0
    assert str(job_id) in result.out and "email" in result.out and "available" in result.out
    assert "--limit" not in result.out
    assert "no jobs" in ctl("jobs", "--state", "failed").out


def test_jobs_usage_errors(ctl: Run) -> None:
    assert ctl("jobs", "--state", "exploded").code == 2
    assert ctl("jobs", "--limit", "0").code == 2


def failed_job(conn: psycopg.Connection, job_id: int) -> None:
    """Make a job look like it failed twice: a dead worker, then an error."""
    conn.execute("UPDATE pulse_jobs SET state = 'failed', attempt = 2, max_attempts = 2,"
                 " finished_at = now(), last_error = 'ValueError: bad address'"
                 " WHERE id = %s", (job_id,))
    conn.execute(
        "INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, outcome,"
        " error_class, error_message, traceback) VALUES"
        " (%s, 1, 'web-1/worker-1', now(), 'worker_died', NULL, 'killed by signal 9', NULL),"
        " (%s, 2, 'web-1/worker-2', now(), 'error', 'ValueError', 'bad address',"
        "  'Traceback (most recent call last):\n  File \"app/jobs.py\", line 7\nValueError')",
        (job_id, job_id))


def test_job_shows_attempts_with_errors_and_tracebacks(ctl: Run,
                                                       conn: psycopg.Connection) -> None:
    job_id = enqueue(ctl, "email", '{"to": "a@example.com"}')
    failed_job(conn, job_id)
    result = ctl("job", str(job_id))
    assert result.code == 0
    for text in ("failed", "2 of 2", "a@example.com", "worker_died", "killed by signal 9",
                 "ValueError: bad address", "attempt 2 traceback", 'File "app/jobs.py", line 7'):
        assert text in result.out, text
    job = ctl("--json", "job", str(job_id)).json
    assert [a["outcome"] for a in job["attempts"]] == ["worker_died", "error"]
    assert all(ATTEMPT_KEYS <= set(a) for a in job["attempts"])
    assert job["attempts"][1]["error"] == "bad address"
    assert job["attempts"][1]["error_class"] == "ValueError"
    assert "app/jobs.py" in job["attempts"][1]["traceback"]
    assert job["last_error"] == "ValueError: bad address"


def test_job_that_does_not_exist(ctl: Run) -> None:
    result = ctl("job", "999999")
    assert result.code == 1
    assert "no job with id 999999" in result.err
    assert ctl("job", "abc").code == 2


# -- cancel and retry ----------------------------------------------------------------------


def test_cancel_then_retry(ctl: Run) -> None:
    job_id = enqueue(ctl, "email")
    result = ctl("cancel", str(job_id))
    assert result.code == 0 and f"job {job_id} cancelled" in result.out
    again = ctl("cancel", str(job_id))
    assert again.code == 1
    assert f"job {job_id} is cancelled" in again.err and "can be cancelled" in again.err
    retried = ctl("--json", "retry", str(job_id))
    assert retried.code == 0 and retried.json["state"] == "available"
    refused = ctl("retry", str(job_id))
    assert refused.code == 1 and f"job {job_id} is available" in refused.err


def test_cancel_and_retry_a_missing_job(ctl: Run) -> None:
    for command in ("cancel", "retry"):
        result = ctl(command, "424242")
        assert result.code == 1
        assert "no job with id 424242" in result.err


def test_retry_a_failed_job_gives_it_another_attempt(ctl: Run,
                                                     conn: psycopg.Connection) -> None:
    job_id = enqueue(ctl, "email")
    failed_job(conn, job_id)
    job = ctl("retry", str(job_id), "--json").json
    assert job["state"] == "available" and job["max_attempts"] == 3


# -- migrate and the database ---------------------------------------------------------------


@pytest.fixture
def empty_dsn(admin_dsn: str) -> Iterator[str]:
    name = unique_name("pulse_empty")
    yield create_database(admin_dsn, name, template="template0")
    drop_database(admin_dsn, name)


def test_migrate_a_fresh_database(run: Run, empty_dsn: str, tmp_path: Path) -> None:
    config = str(write_config(tmp_path / "pulse.toml", empty_dsn))
    unmigrated = run("--config", config, "jobs")
    assert unmigrated.code == 1 and "pulsectl migrate" in unmigrated.err
    first = run("--config", config, "migrate")
    assert first.code == 0 and "applied migration(s) 0001, 0002" in first.out
    second = run("--config", config, "--json", "migrate")
    newest = available_migrations()[-1].version
    assert second.code == 0 and second.json == {"applied": [], "version": newest}
    assert run("--config", config, "jobs").code == 0


def test_migrate_is_a_no_op_on_a_migrated_database(ctl: Run) -> None:
    result = ctl("migrate")
    assert result.code == 0 and "nothing to apply" in result.out


def test_an_unreachable_database_fails_with_a_message(run: Run, tmp_path: Path) -> None:
    config = write_config(tmp_path / "pulse.toml",
                          "postgresql://nobody:secret@127.0.0.1:1/nothing?connect_timeout=2")
    result = run("--config", str(config), "jobs")
    assert result.code == 1
    assert "cannot connect to the database 'nothing' on 127.0.0.1:1" in result.err
    assert "secret" not in result.err


def test_a_bad_config_is_a_usage_error(run: Run, tmp_path: Path) -> None:
    result = run("--config", str(tmp_path / "missing.toml"), "jobs")
    assert result.code == 2 and "missing.toml" in result.err
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nworkers = 'many'\n")
    result = run("--config", str(bad), "jobs")
    assert result.code == 2 and "daemon.workers" in result.err


# -- config init ------------------------------------------------------------------------------


def test_config_init_writes_the_default_config(run: Run, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("config", "init")
    assert result.code == 0 and "pulse.toml" in result.out
    assert (tmp_path / "pulse.toml").read_text() == render_default_config()
    assert load_config(tmp_path / "pulse.toml").daemon.workers >= 0


def test_config_init_refuses_to_overwrite_without_force(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "etc" / "pulse.toml"
    path.parent.mkdir()
    path.write_text("# mine\n")
    result = run("config", "init", str(path))
    assert result.code == 1 and "--force" in result.err
    assert path.read_text() == "# mine\n"
    assert run("config", "init", str(path), "--force").code == 0
    assert path.read_text() == render_default_config()


def test_config_init_to_stdout(run: Run) -> None:
    result = run("config", "init", "-")
    assert result.code == 0 and result.out == render_default_config()


def test_config_init_into_a_missing_directory(run: Run, tmp_path: Path) -> None:
    result = run("config", "init", str(tmp_path / "nope" / "pulse.toml"))
    assert result.code == 1 and "cannot write" in result.err


# -- daemon commands ------------------------------------------------------------------------


@pytest.fixture
def target() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
def daemon(target: FakeTarget) -> Iterator[ServerLoop]:
    """A control server with a fake Supervisor, as a running pulsed would have."""
    directory = Path(tempfile.mkdtemp(prefix="pulse-ctl-", dir="/tmp"))
    loop = ServerLoop(ControlServer(directory / "pulsed.sock", target)).start()
    yield loop
    loop.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def dctl(run: Run, daemon: ServerLoop) -> Run:
    """run() with --socket naming the fake daemon."""
    return lambda *argv: run("--socket", str(daemon.path), *argv)


def test_status_unreachable_exits_3_naming_the_socket(run: Run) -> None:
    result = run("--socket", "/nonexistent/pulsed.sock", "status")
    assert result.code == 3
    assert "/nonexistent/pulsed.sock" in result.err
    assert "pulsed" in result.err and "--socket" in result.err


@pytest.mark.parametrize("argv, status, code", [
    (["--socket", "/nonexistent/pulsed.sock", "status"], 3, "daemon_unreachable"),
    (["job", "987654321"], 1, "failed"),
    (["enqueue", "email", "--priority", "99999"], 2, "usage"),
    (["job", "notanint"], 2, "usage"),  # argparse's own: it printed nothing on stdout
    (["status", "--bogus"], 2, "usage"),
])
def test_json_errors_are_json_on_stdout_too(ctl: Run, argv: list[str], status: int,
                                            code: str) -> None:
    """A script reading `pulsectl --json ...` got an empty stdout on any
    error; now it gets the control socket's error shape there, and people
    still read the message on stderr."""
    result = ctl("--json", *argv)
    assert result.code == status
    assert result.json["ok"] is False and result.json["error"]["code"] == code
    assert result.json["error"]["message"] in result.err
    if code == "daemon_unreachable":
        assert "--socket" in result.json["error"]["hint"]


def test_status_for_people(dctl: Run) -> None:
    result = dctl("status")
    assert result.code == 0
    for text in ("pid 4242", "running", "up 2h 03m", "node web-1", "term 7", "scheduler",
                 "busy", "backoff", "123", "50.0 MiB", "email", "available", "12", "3.5s"):
        assert text in result.out, text


@pytest.mark.parametrize("position", ["before", "after"])
def test_status_json_is_the_daemons_reply(dctl: Run, position: str) -> None:
    argv = ["--json", "status"] if position == "before" else ["status", "--json"]
    result = dctl(*argv)
    assert result.code == 0
    assert result.json == sample_status()


def test_the_socket_comes_from_the_config(run: Run, daemon: ServerLoop, tmp_path: Path) -> None:
    config = tmp_path / "pulse.toml"
    config.write_text(tomli_w.dumps({"daemon": {"socket": str(daemon.path)}}))
    assert run("--config", str(config), "--json", "status").json == sample_status()


def test_scale(dctl: Run, target: FakeTarget) -> None:
    result = dctl("scale", "workers=+2")
    assert result.code == 0 and "workers: 4" in result.out
    assert dctl("--json", "scale", "workers=-1").json == {"workers": 3}
    assert dctl("scale", "workers=8").code == 0
    assert [args for args in target.called("scale")] == [("+2",), ("-1",), ("8",)]


@pytest.mark.parametrize("spec", ["8", "workers", "workers=", "workers=x", "threads=2",
                                  "workers=+-1", "workers=1.5"])
def test_scale_usage_errors(dctl: Run, target: FakeTarget, spec: str) -> None:
    result = dctl("scale", spec)
    assert result.code == 2 and "workers=N" in result.err
    assert target.called("scale") == []


def test_scale_refused_by_the_daemon(dctl: Run) -> None:
    result = dctl("scale", "workers=-10")
    assert result.code == 1
    assert "invalid_argument" in result.err and "workers would be" in result.err


def test_scale_above_the_worker_limit_is_refused_before_asking(dctl: Run,
                                                               target: FakeTarget) -> None:
    result = dctl("scale", f"workers={MAX_WORKERS + 1}")
    assert result.code == 2
    assert f"at most {MAX_WORKERS}" in result.err and "worker processes" in result.err
    assert target.called("scale") == []


def test_scale_past_the_worker_limit_by_a_change_is_refused_by_the_daemon(
        dctl: Run, target: FakeTarget) -> None:
    target.workers = MAX_WORKERS
    result = dctl("scale", "workers=+1")
    assert result.code == 1
    assert f"0..{MAX_WORKERS} (the most worker processes one pulsed runs)" in result.err
    assert target.workers == MAX_WORKERS


def test_drain_and_resume(dctl: Run, target: FakeTarget) -> None:
    target.running = 2
    result = dctl("drain")
    assert result.code == 0 and "draining" in result.out
    assert target.state == "draining"
    assert dctl("resume").code == 0 and target.state == "running"


def test_drain_wait_when_drained(dctl: Run, target: FakeTarget) -> None:
    result = dctl("drain", "--wait")
    assert result.code == 0 and "drained" in result.out
    assert dctl("drain", "--wait", "--json").json["running_jobs"] == 0


def test_drain_wait_times_out(dctl: Run, target: FakeTarget) -> None:
    target.running = 1
    result = dctl("drain", "--wait", "--timeout", "0.3")
    assert result.code == 1
    assert "timed out" in result.err and "1 job" in result.err


def test_reload_and_stop(dctl: Run, target: FakeTarget) -> None:
    assert dctl("reload").code == 0
    assert target.called("reload") == [()]
    result = dctl("stop", "--now")
    assert result.code == 0 and "stopping now" in result.out
    assert target.called("stop") == [(True,)]


def test_write_commands_while_stopping_fail(dctl: Run, target: FakeTarget) -> None:
    target.stopping = True
    result = dctl("scale", "workers=3")
    assert result.code == 1 and "shutting_down" in result.err
    assert dctl("status").code == 0


# -- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [], ["status"], ["scale"], ["drain"], ["resume"], ["reload"], ["stop"], ["jobs"],
    ["job"], ["retry"], ["cancel"], ["enqueue"], ["migrate"], ["config", "init"],
])
def test_every_command_has_help_with_examples(run: Run, argv: list[str]) -> None:
    result = run(*argv, "--help")
    assert result.code == 0
    assert "examples:" in result.out and "usage: pulsectl" in result.out


def test_no_command_is_a_usage_error(run: Run) -> None:
    assert run().code == 2
    assert run("explode").code == 2
    assert run("config").code == 2


# -- issue 24, item 9: what people read ---------------------------------------------


LONG_ERROR = ("HandlerNotFound: no handler is registered for job type 'a-type-nobody-handles'; "
              "name its module in worker.handlers")


def test_piped_output_is_never_cut(ctl: Run, conn: psycopg.Connection) -> None:
    """capsys is not a terminal, as `pulsectl jobs | grep` is not: no cell is cut."""
    job_id = enqueue(ctl, "a-type-nobody-handles-" + "x" * 60)
    conn.execute("UPDATE pulse_jobs SET state = 'failed', last_error = %s WHERE id = %s",
                 (LONG_ERROR, job_id))
    result = ctl("jobs")
    assert result.code == 0
    assert LONG_ERROR in result.out and "x" * 60 in result.out
    assert "…" not in result.out


def test_job_names_the_error_class_once(ctl: Run, conn: psycopg.Connection) -> None:
    job_id = enqueue(ctl, "email")
    conn.execute(
        "INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, outcome,"
        " error_class, error_message) VALUES (%s, 1, 'w', now(), 'error', 'RuntimeError',"
        " 'RuntimeError: boom'), (%s, 2, 'w', now(), 'error', 'ValueError', 'bad address')",
        (job_id, job_id))
    out = ctl("job", str(job_id)).out
    assert "attempt 1: RuntimeError: boom" in out and "RuntimeError: RuntimeError" not in out
    assert "attempt 2: ValueError: bad address" in out


def test_jobs_says_when_large_payloads_ended_the_page_early(ctl: Run, monkeypatch) -> None:
    monkeypatch.setattr(store_operator, "MAX_LIST_BYTES", 10)
    ids = [enqueue(ctl, "email", '{"blob": "' + "x" * 100 + '"}') for _ in range(3)]
    listed = ctl("--json", "jobs")
    assert ([j["id"] for j in listed.json["jobs"]], listed.json["next_after"]) == (
        [max(ids)], max(ids))
    assert "fill a page (16 MiB)" in ctl("jobs").out


def test_delete_of_a_job_that_is_not_there_or_not_deletable_fails(ctl: Run,
                                                                  conn: psycopg.Connection) -> None:
    # it printed {"dry_run": true, "matched": 0} and exited 0 (no --dry-run given)
    result = ctl("--json", "delete", "987654321")
    assert result.code == 1 and "no job with id 987654321" in result.err
    assert result.json == {"ok": False, "error": {"code": "failed",
                                                  "message": "no job with id 987654321"}}
    job_id = enqueue(ctl, "email")
    conn.execute("UPDATE pulse_jobs SET state = 'running', lease_token = gen_random_uuid(), "
                 "lease_owner = 'w', lease_expires_at = now() + interval '1 minute', "
                 "started_at = now(), attempt = 1 WHERE id = %s", (job_id,))
    conn.commit()
    result = ctl("delete", str(job_id))
    assert result.code == 1 and f"job {job_id} is running; only" in result.err
    result = ctl("queue", "resume", "a\nb")  # any name: one stored before the check goes
    assert result.code == 0, result.err
    result = ctl("--json", "delete", "--state", "completed", "--type", "none-such", "--yes")
    assert result.code == 0
    assert result.json["dry_run"] is False and result.json["matched"] == 0


@pytest.mark.parametrize(("argv", "words"), [
    # these reached the database: "timestamp out of range", "bigint out of range"
    (["delete", "--state", "completed", "--older-than", "100000000000000", "--dry-run"],
     "--older-than: not a duration of at most 100 years"),
    (["delete", "--state", "completed", "--older-than", "99999999999999999999d", "--dry-run"],
     "--older-than: not a duration of at most 100 years"),
    (["jobs", "--limit", "99999999999999999999"], "--limit: must be an integer from 1 to"),
    (["job", "99999999999999999999"], "ID: must be an integer from 1 to"),
    # a traceback: "sleep length must be non-negative", "Invalid value NaN"
    (["top", "--interval", "-1"], "--interval: not a duration"),
    (["top", "--interval", "nan"], "--interval: not a duration"),
    (["top", "--interval", "0.01"], "--interval: must be 0.1 to 3600 seconds"),
    # names no job can have were stored as paused
    (["queue", "pause", "a\nb"], "the queue name must not contain control characters"),
    (["queue", "pause", "q" * 300], "the queue name must be at most 255 characters"),
])
def test_out_of_range_arguments_are_usage_errors(ctl: Run, argv: list[str], words: str) -> None:
    result = ctl(*argv)
    assert result.code == 2 and words in result.err, result
    assert "Traceback" not in result.err
