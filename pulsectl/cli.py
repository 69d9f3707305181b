"""pulsectl: control a running pulsed, and inspect and change jobs.

Daemon commands (status, scale, drain, resume, reload, stop) talk to pulsed
over its control socket. Job commands (jobs, job, retry, cancel, enqueue,
migrate) go straight to the database: the one the config names (they work
while the daemon is down), or else the embedded PostgreSQL of the running
pulsed, which they never start themselves (its owner is the pulsed that
started it). Exit status: 0 ok, 1 the command failed, 2 usage, 3 the daemon
(or, with no database.url, its embedded database) could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from rich.console import Console

from pulsectl import bulk, render, top
from pulsed import serialize
from pulsed.api import UNIQUE_WHILE, enqueue, job_params
from pulsed.config import Config, load_config, parse_duration, render_default_config
from pulsed.control.client import DEFAULT_TIMEOUT, ControlClient, DaemonUnreachable
from pulsed.control.protocol import (DEFAULT_LOG_LINES, MAX_LOG_LINES, ROLES, TIMEOUT,
                                     ControlError)
from pulsed.db.migrate import current_version, migrate
from pulsed.db.store import Store
from pulsed.dsn import find_database
from pulsed.errors import (
    EXIT_FAILURE, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, ConfigError, JobInputError, NoDatabase,
    PulseError,
)
from pulsed.jobs import JobState
from pulsed.waiting import wait

PROG = "pulsectl"
DEFAULT_LIMIT = 50
EXIT_INTERRUPTED = 130
WAIT_FOREVER = -1.0  # `enqueue --wait` without a number of seconds
FOLLOW_POLL_S = 0.5  # logs --follow asks the daemon for new lines this often
HELP_WIDTH = 78
PIPE_WIDTH = 1_000_000  # columns when stdout is not a terminal: in effect, no limit
CANCELLABLE = ("scheduled", "available", "running", "retryable")
RETRYABLE = ("completed", "failed", "cancelled", "retryable", "scheduled")
# enqueue's keyword -> the option that sets it, for error messages
ENQUEUE_OPTIONS = {"type": "TYPE", "payload": "PAYLOAD_JSON", "priority": "--priority",
                   "delay": "--delay", "queue": "--queue", "max_attempts": "--max-attempts",
                   "idempotency_key": "--idempotency-key", "timeout": "[types] timeout",
                   "unique_while": "--unique-while", "unique_for": "--unique-for"}


class CommandFailed(PulseError):
    """The command failed (exit status 1)."""


class UsageError(PulseError):
    """The command line is wrong (exit status 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run pulsectl; return its exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except DaemonUnreachable as exc:
        _error(f"{exc}\n  Is pulsed running? Start it with `pulsed`, or point --socket "
               "(or --config) at its control socket.")
        return EXIT_UNREACHABLE
    except NoDatabase as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE
    except ControlError as exc:
        _error(f"pulsed: {exc.message} ({exc.code})")
        return EXIT_FAILURE
    except (UsageError, ConfigError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except PulseError as exc:  # CommandFailed, StoreError, EmbeddedServerError, ...
        _error(str(exc))
        return EXIT_FAILURE


# -- the command line -----------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Control a running pulsed, and inspect and change Pulse jobs.",
        epilog="Daemon commands use the control socket (--socket, or daemon.socket in the "
               "config).\nJob commands use the database in the config, daemon running or not."
               "\nExit status: 0 ok, 1 the command failed, 2 usage, 3 pulsed unreachable.\n\n"
               "examples:\n  pulsectl status\n  pulsectl --json status | jq .children\n"
               "  pulsectl scale workers=+2\n  pulsectl jobs --state failed\n"
               "  pulsectl --config /etc/pulsed/pulse.toml job 42")
    parser.add_argument("--config", metavar="PATH", type=Path,
                        help="config file (default ./pulse.toml, then /etc/pulsed/pulse.toml)")
    parser.add_argument("--socket", metavar="PATH", type=Path,
                        help="pulsed's control socket (default: daemon.socket in the config)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON for scripts (also accepted after the command)")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _daemon_commands(commands)
    _job_commands(commands)
    _config_commands(commands)
    return parser


def _command(commands: Any, name: str, run: Callable[[argparse.Namespace], int], summary: str,
             description: str, examples: Sequence[str], *, json_flag: bool = True
             ) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name, help=summary, description=textwrap.fill(description, HELP_WIDTH),
        formatter_class=_Formatter,
        epilog="examples:\n" + "\n".join(f"  pulsectl {e}" for e in examples))
    if json_flag:  # SUPPRESS: given here or before the command, either counts
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print JSON for scripts")
    sub.set_defaults(run=run)
    return sub


def _daemon_commands(commands: Any) -> None:
    _command(commands, "status", cmd_status, "show the daemon, its children and the queues",
             "Show the master (pid, state, uptime, node), the leader and its term, each "
             "child (role, pid, state, current job, jobs done, restarts, RSS), the queue "
             "depth per type and state, and the age of the oldest available job.",
             ["status", "--json status"])
    sub = _command(commands, "top", top.main, "a live view: workers, their jobs, throughput, queues",
                   "Show the daemon live, refreshed every second: each child and its current "
                   "job, jobs finished and failed for good over the last minute, and the queue "
                   "depths. Ctrl-C quits.", ["top", "top --interval 2"], json_flag=False)
    sub.add_argument("--interval", metavar="S", type=float, default=1.0,
                     help="seconds between refreshes (default 1)")
    sub = _command(commands, "scale", cmd_scale, "set the number of worker processes",
                   "Set the worker count (N), or change it (+N, -N). Shrinking lets busy "
                   "workers finish their job first.",
                   ["scale workers=8", "scale workers=+2", "scale workers=-1"])
    sub.add_argument("workers", metavar="workers=N|+N|-N", type=_workers_spec,
                     help="the new count, or a change to it")
    sub = _command(commands, "drain", cmd_drain, "claim no new jobs on this node",
                   "Stop claiming new jobs on this node; running jobs finish. With --wait, "
                   "return once no job runs here (exit 1 if --timeout passes first; the "
                   "node stays draining). `pulsectl resume` undoes a drain.",
                   ["drain", "drain --wait --timeout 5m"])
    sub.add_argument("--wait", action="store_true",
                     help="return only once no job runs on this node")
    sub.add_argument("--timeout", metavar="S", type=_duration,
                     help="with --wait: give up after S (seconds, or 30s, 5m); default: none")
    _command(commands, "resume", cmd_resume, "claim jobs again after a drain",
             "Undo `pulsectl drain`: workers claim jobs again.", ["resume"])
    _command(commands, "reload", cmd_reload, "reload the config, replace workers gracefully",
             "Reload the config file (like SIGHUP) and replace the workers gracefully: "
             "each finishes its running job before it is replaced.", ["reload"])
    sub = _command(commands, "stop", cmd_stop, "stop the daemon",
                   "Stop pulsed. By default gracefully: claim nothing new, give running "
                   "jobs up to daemon.stop_timeout to finish (like SIGTERM). With --now, "
                   "stop at once (like SIGQUIT); interrupted jobs are retried.",
                   ["stop", "stop --now"])
    sub.add_argument("--now", action="store_true", help="fast stop: do not wait for jobs")
    _operator_commands(commands)


def _operator_commands(commands: Any) -> None:
    sub = _command(commands, "restart", cmd_restart, "replace one child gracefully",
                   "Replace one child process: it finishes its running jobs (up to "
                   "daemon.stop_timeout) while a new one takes its place. Not counted as a "
                   "crash.", ["restart worker 2", "restart scheduler"])
    sub.add_argument("role", choices=ROLES, help="the child's role")
    sub.add_argument("index", metavar="N", type=int, nargs="?", default=None,
                     help="the child's index (workers: from 1; others: 0, the default)")
    sub = _command(commands, "logs", cmd_logs, "the children's recent log lines",
                   "Print the last lines the children wrote to stderr, kept by the master "
                   f"({MAX_LOG_LINES} a child, across its restarts, so a crash's traceback "
                   "stays readable). With --follow, keep printing new lines until Ctrl-C.",
                   ["logs", "logs worker 2 -n 50", "logs scheduler --follow"])
    sub.add_argument("role", choices=ROLES, nargs="?", default=None,
                     help="only this role's children (default: every child)")
    sub.add_argument("index", metavar="N", type=int, nargs="?", default=None,
                     help="only the child with this index")
    sub.add_argument("-n", "--lines", metavar="LINES", type=_log_lines, default=DEFAULT_LOG_LINES,
                     help=f"how many (default {DEFAULT_LOG_LINES}, at most {MAX_LOG_LINES})")
    sub.add_argument("-f", "--follow", action="store_true", help="print new lines as they come")


def _job_commands(commands: Any) -> None:
    sub = _command(commands, "jobs", cmd_jobs, "list jobs, newest first",
                   "List jobs from the database, newest first.",
                   ["jobs", "jobs --state failed --type email", "--json jobs --limit 500"])
    sub.add_argument("--state", choices=[s.value for s in JobState], help="only this state")
    sub.add_argument("--type", metavar="T", help="only this job type")
    sub.add_argument("--limit", metavar="N", type=_positive_int, default=DEFAULT_LIMIT,
                     help=f"at most N jobs (default {DEFAULT_LIMIT})")
    sub = _command(commands, "job", cmd_job, "show one job with its attempts",
                   "Show one job: its fields, and each attempt with its outcome, error "
                   "and traceback.", ["job 42", "job 42 --json"])
    sub.add_argument("id", metavar="ID", type=_positive_int, help="the job's id")
    sub = _command(commands, "retry", cmd_retry, "run a finished or waiting job again now",
                   "Make a completed, failed, cancelled, retryable or scheduled job available "
                   "now. A job out of attempts gets one more.",
                   ["retry 42", "retry --state failed --type email --dry-run"])
    sub.add_argument("id", metavar="ID", type=_positive_int, nargs="?", help="the job's id")
    bulk.add_filter_arguments(sub)
    sub = _command(commands, "cancel", cmd_cancel, "cancel a job that has not finished",
                   "Cancel a scheduled, available, running or retryable job. A running "
                   "job's worker can no longer complete it.",
                   ["cancel 42", "cancel --queue reports --state scheduled --yes"])
    sub.add_argument("id", metavar="ID", type=_positive_int, nargs="?", help="the job's id")
    bulk.add_filter_arguments(sub)
    sub = _command(commands, "delete", cmd_delete, "delete jobs (not running ones)",
                   "Delete a job, or every job matching a filter, with its attempts. "
                   "Running jobs are left alone: cancel them first.",
                   ["delete 42", "delete --state completed --older-than 7d --yes"])
    sub.add_argument("id", metavar="ID", type=_positive_int, nargs="?", help="the job's id")
    bulk.add_filter_arguments(sub)
    _enqueue_command(commands)
    _queue_command(commands)
    _command(commands, "migrate", cmd_migrate, "create or upgrade the database schema",
             "Apply the schema migrations not yet applied to the configured database, "
             "and print the versions applied.", ["migrate", "--config prod.toml migrate"])


def _queue_command(commands: Any) -> None:
    sub = _command(commands, "queue", cmd_queue, "pause or resume a queue cluster-wide",
                   "Pause a queue: no worker on any host claims its jobs (running ones "
                   "finish) until it is resumed. Persisted in the database. `queue list` "
                   "shows the paused queues.",
                   ["queue pause emails", "queue resume emails", "queue list"])
    sub.add_argument("action", choices=["pause", "resume", "list"], help="what to do")
    sub.add_argument("name", metavar="NAME", nargs="?", help="the queue (not for list)")


def cmd_queue(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        raise UsageError(f"queue {args.action}: name the queue, e.g. `pulsectl queue "
                         f"{args.action} default`")
    with _store(args) as store:
        if args.action == "pause":
            store.pause_queue(args.name)
        elif args.action == "resume":
            store.resume_queue(args.name)
        paused = store.paused_queues()
    messages = {"pause": f"queue {args.name} paused on every host",
                "resume": f"queue {args.name} resumed",
                "list": "paused queues: " + (", ".join(paused) or "none")}
    _output(args, {"paused": paused}, lambda: messages[args.action])
    return EXIT_OK


def _enqueue_command(commands: Any) -> None:
    sub = _command(commands, "enqueue", cmd_enqueue, "add a job and print its id",
                   "Add a job and print its id. Unset options come from [types.TYPE] in the "
                   "config, then the defaults.",
                   ["enqueue email '{\"to\": \"a@example.com\"}'",
                    "enqueue report --delay 10m --priority -5",
                    "enqueue sync --idempotency-key sync-2024-06-01 --queue slow",
                    "enqueue reindex --idempotency-key reindex --unique-while unfinished",
                    "enqueue email - < payload.json"])
    sub.add_argument("type", metavar="TYPE", help="the job type (its handler's name)")
    sub.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?", type=_json_object,
                     default={}, help="a JSON object (default {}); - reads it from stdin")
    sub.add_argument("--priority", metavar="N", type=int, help="lower runs first (default 0)")
    sub.add_argument("--delay", metavar="S", type=_duration,
                     help="run after S (seconds, or 30s, 5m, 1h)")
    sub.add_argument("--queue", metavar="Q", default="default",
                     help="the queue (default 'default')")
    sub.add_argument("--idempotency-key", metavar="K",
                     help="a second enqueue with K returns the first job's id")
    sub.add_argument("--unique-while", metavar="STATE", choices=UNIQUE_WHILE,
                     help="hold K only while the job is unfinished (then K is free again)")
    sub.add_argument("--unique-for", metavar="S", type=_duration,
                     help="hold K for S (seconds, or 30s, 5m, 1h) from now")
    sub.add_argument("--max-attempts", metavar="N", type=int, help="attempts before it fails")
    sub.add_argument("--wait", metavar="S", nargs="?", type=_duration, const=WAIT_FOREVER,
                     help="wait for the job to finish (at most S seconds) and print its "
                          "result; exit 0 if it completed, 1 if it failed or was cancelled")


def _config_commands(commands: Any) -> None:
    config = commands.add_parser("config", help="config file helpers",
                                 description="Config file helpers.", formatter_class=_Formatter)
    actions = config.add_subparsers(title="commands", metavar="COMMAND", required=True)
    sub = _command(actions, "init", cmd_config_init, "write a commented default config",
                   "Write a commented config with every key at its default.",
                   ["config init", "config init /etc/pulsed/pulse.toml", "config init -"],
                   json_flag=False)
    sub.add_argument("path", metavar="PATH", nargs="?", default="pulse.toml",
                     help="where to write it (default ./pulse.toml; - for stdout)")
    sub.add_argument("--force", action="store_true", help="overwrite an existing file")
    _command(actions, "dsn", cmd_config_dsn, "print the database URL applications use",
             "Print the database URL: database.url (or PULSE_DATABASE_URL), else the "
             "embedded PostgreSQL of the running pulsed (exit 3 if none runs). "
             "pulsed.connect() in Python opens the same database.",
             ["config dsn", "config dsn --json", "--config /etc/pulsed/pulse.toml config dsn",
              'psql "$(pulsectl config dsn)"'])


# -- argument types (argparse reports their errors, exit status 2) ------------------


def _workers_spec(text: str) -> str:
    name, equals, value = text.partition("=")
    value = value.strip()
    digits = value[1:] if value[:1] in "+-" else value
    if name.strip() != "workers" or not equals or not digits.isdigit() or not digits.isascii():
        raise argparse.ArgumentTypeError(
            f"expected workers=N, workers=+N or workers=-N, got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
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


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (seconds, or like "
                                         "30s, 5m, 1h)") from None


def _log_lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LOG_LINES:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_LOG_LINES}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


# -- daemon commands ----------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).request("status")
    _output(args, status, lambda: render.status_view(status))
    return EXIT_OK


def cmd_scale(args: argparse.Namespace) -> int:
    result = _client(args).request("scale", workers=args.workers)
    _output(args, result, lambda: f"workers: {result.get('workers')}")
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    if not args.wait:
        result = _client(args).request("drain")
        _output(args, result, lambda: "draining: no new jobs are claimed on this node "
                                      "(`pulsectl resume` undoes it)")
        return EXIT_OK
    if not args.json:
        _console(stderr=True).print("draining; waiting for running jobs to finish…")
    try:  # the client waits as long as the daemon does, plus a margin
        result = _client(args).request("drain", wait=True, timeout=args.timeout)
    except ControlError as exc:
        if exc.code != TIMEOUT:
            raise
        raise CommandFailed(f"drain --wait timed out: {exc.message}") from None
    _output(args, result, lambda: f"drained: no job is running on this node (waited "
                                  f"{render.format_duration(result.get('waited_s'))})")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    result = _client(args).request("resume")
    _output(args, result, lambda: _with_state("resumed: claiming jobs again", result))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    result = _client(args).request("reload")
    _output(args, result, lambda: _with_state("reloading the config; workers are replaced "
                                              "gracefully", result))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    result = _client(args).request("stop", now=args.now)
    message = "stopping now" if args.now else "stopping: running jobs may finish first"
    _output(args, result, lambda: _with_state(message, result))
    return EXIT_OK


def cmd_restart(args: argparse.Namespace) -> int:
    index = args.index if args.index is not None else (1 if args.role == "worker" else 0)
    result = _client(args).request("restart", role=args.role, index=index)
    _output(args, result, lambda: f"restarting {args.role} {index} (pid {result.get('pid')}): "
                                  "a new one takes its place once its jobs finish")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.request("logs", role=args.role, index=args.index, lines=args.lines)
    _print_log_lines(args, result)
    after = result.get("last_seq")
    while args.follow:
        time.sleep(FOLLOW_POLL_S)
        result = client.request("logs", role=args.role, index=args.index,
                                lines=MAX_LOG_LINES, after=after)
        _print_log_lines(args, result)
        after = result.get("last_seq", after)
    return EXIT_OK


def _print_log_lines(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """One line each, prefixed with its child (plain text: a log line is
    not rich markup); with --json, each line as a JSON object."""
    for line in result.get("lines") or []:
        sys.stdout.write(json.dumps(line) if args.json else
                         f"{line.get('role')} {line.get('index')} | {line.get('text')}")
        sys.stdout.write("\n")
    sys.stdout.flush()


def _with_state(message: str, result: dict[str, Any]) -> str:
    return f"{message} (state: {result['state']})" if result.get("state") else message


# -- job commands -------------------------------------------------------------------


def cmd_jobs(args: argparse.Namespace) -> int:
    with _store(args) as store:
        jobs = [serialize.job_to_dict(r) for r in
                store.list_jobs(state=args.state, type=args.type, limit=args.limit)]
    if args.json:
        _print_json({"jobs": jobs})
    elif not jobs:
        _console().print("no jobs", style="dim")
    else:
        _console().print(render.jobs_table(jobs))
        if len(jobs) == args.limit:
            _console().print(f"showing the newest {args.limit}; --limit shows more", style="dim")
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    with _store(args) as store:
        record = store.get_job(args.id)
    if record is None:
        raise CommandFailed(f"no job with id {args.id}")
    job = serialize.job_to_dict(record)
    _output(args, job, lambda: render.job_view(job))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    if args.id is None or args.dry_run:
        return _bulk(args, "cancel")
    return _change(args, Store.cancel, "cancelled", "cancelled", CANCELLABLE)


def cmd_retry(args: argparse.Namespace) -> int:
    if args.id is None or args.dry_run:
        return _bulk(args, "retry")
    return _change(args, Store.retry, "retried", "will run again (available now)", RETRYABLE)


def cmd_delete(args: argparse.Namespace) -> int:
    return _bulk(args, "delete")


def _bulk(args: argparse.Namespace, action: str) -> int:
    """By filter, or one job by ID (delete, --dry-run): pulsectl/bulk.py."""
    try:
        return bulk.run(args, action, _store, _output)
    except bulk.BulkUsageError as exc:
        raise UsageError(str(exc)) from None


def _change(args: argparse.Namespace, action: Callable[[Store, int], bool], verb: str,
            done: str, allowed: Sequence[str]) -> int:
    if bulk.has_filter(args):
        raise UsageError("give a job ID or a filter, not both")
    with _store(args) as store:
        changed = action(store, args.id)
        record = store.get_job(args.id, with_attempts=False)
    if record is None:
        raise CommandFailed(f"no job with id {args.id}")
    if not changed:
        raise CommandFailed(f"job {args.id} is {record.state.value}; only "
                            f"{', '.join(allowed[:-1])} or {allowed[-1]} jobs can be {verb}")
    job = serialize.job_to_dict(record)
    _output(args, job, lambda: f"job {args.id} {done}")
    return EXIT_OK


def cmd_enqueue(args: argparse.Namespace) -> int:
    config = _config(args)
    defaults = config.type_config(args.type)
    options = {
        "type": args.type, "payload": args.payload, "queue": args.queue,
        "priority": _first(args.priority, defaults.priority, 0),
        "delay": args.delay, "idempotency_key": args.idempotency_key,
        "max_attempts": _first(args.max_attempts, defaults.max_attempts),
        "timeout": defaults.timeout,
        "unique_while": args.unique_while, "unique_for": args.unique_for,
    }
    try:
        job_params(**options)  # every argument checked before connecting
    except JobInputError as exc:
        option = ENQUEUE_OPTIONS.get(exc.argument, exc.argument)
        raise UsageError(f"enqueue {option}: {exc.problem}") from None
    with _connection(config) as conn:
        with conn.transaction():
            job_id = enqueue(conn, **options)
            record = Store(conn).get_job(job_id, with_attempts=False) if args.json else None
        if args.wait is not None:
            return _wait_and_print(args, conn, job_id)
    if record is not None:
        _print_json(serialize.job_to_dict(record))
    else:
        print(job_id)
    return EXIT_OK


def _wait_and_print(args: argparse.Namespace, conn: Any, job_id: int) -> int:
    """`enqueue --wait`: the finished job's result (or its error); exit 0
    when it completed, 1 when it failed or was cancelled or time ran out."""
    timeout = None if args.wait == WAIT_FOREVER else args.wait
    try:
        record = wait(conn, job_id, timeout)
    except TimeoutError as exc:
        raise CommandFailed(f"{exc}; `pulsectl job {job_id}` shows it later") from None
    completed = record.state.value == "completed"
    if args.json:
        _print_json(serialize.job_to_dict(record))
    elif completed:
        print(serialize.to_json(record.result) if record.result is not None else job_id)
    else:
        print(f"job {job_id} {record.state.value}: {record.last_error or '(no error recorded)'}",
              file=sys.stderr)
    return EXIT_OK if completed else EXIT_FAILURE


def cmd_migrate(args: argparse.Namespace) -> int:
    with _connection(_config(args)) as conn:
        try:
            applied = migrate(conn)
        except PulseError as exc:
            raise CommandFailed(str(exc)) from exc
        version = current_version(conn)
    if args.json:
        _print_json({"applied": applied, "version": version})
    elif applied:
        names = ", ".join(f"{v:04d}" for v in applied)
        print(f"applied migration(s) {names}; the schema is at version {version}")
    else:
        print(f"nothing to apply; the schema is at version {version}")
    return EXIT_OK


def cmd_config_dsn(args: argparse.Namespace) -> int:
    database = find_database(_config(args))
    if args.json:
        _print_json({"dsn": database.dsn, "source": database.source, "where": database.where})
    else:
        print(database.dsn)  # plain: for "$(pulsectl config dsn)", never wrapped
    return EXIT_OK


def cmd_config_init(args: argparse.Namespace) -> int:
    text = render_default_config()
    if args.path == "-":
        sys.stdout.write(text)
        return EXIT_OK
    path = Path(args.path)
    try:
        with path.open("w" if args.force else "x") as file:
            file.write(text)
    except FileExistsError:
        raise CommandFailed(f"{path} exists; --force overwrites it") from None
    except OSError as exc:
        raise CommandFailed(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"wrote {path}")
    return EXIT_OK


# -- helpers ------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    if getattr(args, "_loaded_config", None) is None:
        args._loaded_config = load_config(args.config)
    return args._loaded_config


def _client(args: argparse.Namespace) -> ControlClient:
    path = args.socket if args.socket is not None else _config(args).daemon.socket_path
    return ControlClient(path, timeout=DEFAULT_TIMEOUT)


@contextmanager
def _connection(config: Config) -> Iterator[psycopg.Connection]:
    database = find_database(config)
    if config.source is None and database.source == "embedded":
        # Run from a folder without pulse.toml: say whose jobs these are.
        _error(f"no pulse.toml here; using the embedded database of the pulsed in "
               f"{config.daemon.state_dir}")
    dsn = database.dsn
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise CommandFailed(f"cannot connect to the database {_describe(dsn)}: "
                            f"{str(exc).strip()}") from exc
    try:
        with conn:
            yield conn
    except psycopg.errors.UndefinedTable as exc:
        raise CommandFailed(f"the database {_describe(dsn)} has no Pulse schema; "
                            "run `pulsectl migrate`") from exc
    except psycopg.Error as exc:
        raise CommandFailed(f"database error: {str(exc).strip()}") from exc


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[Store]:
    with _connection(_config(args)) as conn:
        yield Store(conn)


def _describe(dsn: str) -> str:
    """Where a DSN points, without its password."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable DSN)"
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"'{info.get('dbname') or info.get('user') or ''}' on {host}{port}"


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _output(args: argparse.Namespace, data: Any, human: Callable[[], Any]) -> None:
    if args.json:
        _print_json(data)
    else:
        _console().print(human())


def _print_json(data: Any) -> None:
    sys.stdout.write(serialize.to_json(data) + "\n")


def _console(*, stderr: bool = False) -> Console:
    """A terminal gets tables fitted to its width; anything else (a pipe, a
    file, `| grep`) gets every cell whole: rich would otherwise assume 80
    columns and cut them ("HandlerNotFo…")."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, width=PIPE_WIDTH, soft_wrap=True)


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
