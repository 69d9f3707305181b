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
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pulsectl import top
from pulsectl.arguments import (duration, json_object, log_lines, positive_int, refresh_interval,
                                workers_spec)
from pulsectl.context import (DEFAULT_LIMIT, EXIT_INTERRUPTED, HELP_WIDTH, PROG, WAIT_FOREVER,
                              UsageError, print_error, print_json)
from pulsectl.daemon_commands import (cmd_drain, cmd_logs, cmd_reload, cmd_restart, cmd_resume,
                                      cmd_scale, cmd_status, cmd_stop)
from pulsectl import bulk
from pulsectl.job_commands import (cmd_cancel, cmd_delete, cmd_enqueue, cmd_job, cmd_jobs,
                                   cmd_queue, cmd_retry)
from pulsectl.setup_commands import cmd_config_dsn, cmd_config_init, cmd_migrate
from pulsed.api import UNIQUE_WHILE
from pulsed.control.client import DaemonNotAnswering, DaemonUnreachable
from pulsed.control.protocol import DEFAULT_LOG_LINES, MAX_LOG_LINES, ROLES, ControlError
from pulsed.errors import (EXIT_FAILURE, EXIT_UNREACHABLE, EXIT_USAGE, ConfigError, NoDatabase,
                           PulseError)
from pulsed.jobs import JobState


def main(argv: Sequence[str] | None = None) -> int:
    """Run pulsectl; return its exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None

    def failed(status: int, code: str, message: str, hint: str | None = None,
               said: str | None = None) -> int:
        as_json = args.json if args is not None else "--json" in words  # unparsed: as typed
        return _failed(as_json, status, code, message, hint, said)

    try:
        args = build_parser().parse_args(words)
        return args.run(args)
    except SystemExit as exc:  # argparse: --help and --version (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except DaemonNotAnswering as exc:  # "Is pulsed running?" would mislead: it is
        return failed(EXIT_UNREACHABLE, "daemon_unreachable", str(exc),
                      "pulsed holds its control socket but did not answer: it may be "
                      "stopped (SIGSTOP, a debugger) or overloaded. A command it had not "
                      "read by now is dropped, not carried out later.")
    except DaemonUnreachable as exc:
        return failed(EXIT_UNREACHABLE, "daemon_unreachable", str(exc),
                      "Is pulsed running? Start it with `pulsed`, or point --socket (or "
                      "--config) at its control socket.")
    except NoDatabase as exc:
        return failed(EXIT_UNREACHABLE, "database_unreachable", str(exc))
    except ControlError as exc:
        return failed(EXIT_FAILURE, exc.code, exc.message,
                      said=f"pulsed: {exc.message} ({exc.code})")
    except (UsageError, ConfigError) as exc:
        return failed(EXIT_USAGE, "usage", str(exc))
    except PulseError as exc:  # CommandFailed, StoreError, EmbeddedServerError, ...
        return failed(EXIT_FAILURE, "failed", str(exc))


def _failed(as_json: bool, status: int, code: str, message: str, hint: str | None = None,
            said: str | None = None) -> int:
    """Say why on stderr; with --json, also as JSON on stdout, so a script
    reading stdout gets an object whatever happened (the control
    socket's error shape, SPEC §6)."""
    said = message if said is None else said
    print_error(said if hint is None else f"{said}\n  {hint}")
    if as_json:
        error = {"code": code, "message": message} | ({"hint": hint} if hint else {})
        print_json({"ok": False, "error": error})
    return status


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is raised as UsageError (after
    the usage line), not printed and exited: with --json it is answered in
    JSON too. Its subcommands' parsers are of this class as well."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command}: {message}" if command else message)


# -- the command line -----------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    sub.add_argument("--interval", metavar="S", type=refresh_interval, default=1.0,
                     help="seconds between refreshes (default 1)")
    sub = _command(commands, "scale", cmd_scale, "set the number of worker processes",
                   "Set the worker count (N), or change it (+N, -N). Shrinking lets busy "
                   "workers finish their job first. With daemon.workers = \"MIN..MAX\" this "
                   "pins the count; workers=auto returns to autoscaling.",
                   ["scale workers=8", "scale workers=+2", "scale workers=-1",
                    "scale workers=auto"])
    sub.add_argument("workers", metavar="workers=N|+N|-N|auto", type=workers_spec,
                     help="the new count, or a change to it")
    sub = _command(commands, "drain", cmd_drain, "claim no new jobs on this node",
                   "Stop claiming new jobs on this node; running jobs finish. With --wait, "
                   "return once no job runs here (exit 1 if --timeout passes first; the "
                   "node stays draining). `pulsectl resume` undoes a drain.",
                   ["drain", "drain --wait --timeout 5m"])
    sub.add_argument("--wait", action="store_true",
                     help="return only once no job runs on this node")
    sub.add_argument("--timeout", metavar="S", type=duration,
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
    sub.add_argument("-n", "--lines", metavar="LINES", type=log_lines, default=DEFAULT_LOG_LINES,
                     help=f"how many (default {DEFAULT_LOG_LINES}, at most {MAX_LOG_LINES})")
    sub.add_argument("-f", "--follow", action="store_true", help="print new lines as they come")


def _job_commands(commands: Any) -> None:
    sub = _command(commands, "jobs", cmd_jobs, "list jobs, newest first",
                   "List jobs from the database, newest first.",
                   ["jobs", "jobs --state failed --type email", "--json jobs --limit 500"])
    sub.add_argument("--state", choices=[s.value for s in JobState], help="only this state")
    sub.add_argument("--type", metavar="T", help="only this job type")
    sub.add_argument("--limit", metavar="N", type=positive_int, default=DEFAULT_LIMIT,
                     help=f"at most N jobs (default {DEFAULT_LIMIT})")
    sub = _command(commands, "job", cmd_job, "show one job with its attempts",
                   "Show one job: its fields, and each attempt with its outcome, error "
                   "and traceback.", ["job 42", "job 42 --json"])
    sub.add_argument("id", metavar="ID", type=positive_int, help="the job's id")
    sub = _command(commands, "retry", cmd_retry, "run a finished or waiting job again now",
                   "Make a completed, failed, cancelled, retryable or scheduled job available "
                   "now. A job out of attempts gets one more.",
                   ["retry 42", "retry --state failed --type email --dry-run"])
    sub.add_argument("id", metavar="ID", type=positive_int, nargs="?", help="the job's id")
    bulk.add_filter_arguments(sub)
    sub = _command(commands, "cancel", cmd_cancel, "cancel a job that has not finished",
                   "Cancel a scheduled, available, running or retryable job. A running "
                   "job's worker can no longer complete it.",
                   ["cancel 42", "cancel --queue reports --state scheduled --yes"])
    sub.add_argument("id", metavar="ID", type=positive_int, nargs="?", help="the job's id")
    bulk.add_filter_arguments(sub)
    sub = _command(commands, "delete", cmd_delete, "delete jobs (not running ones)",
                   "Delete a job, or every job matching a filter, with its attempts. "
                   "Running jobs are left alone: cancel them first.",
                   ["delete 42", "delete --state completed --older-than 7d --yes"])
    sub.add_argument("id", metavar="ID", type=positive_int, nargs="?", help="the job's id")
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
    sub.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?", type=json_object,
                     default={}, help="a JSON object (default {}); - reads it from stdin")
    sub.add_argument("--priority", metavar="N", type=int, help="lower runs first (default 0)")
    sub.add_argument("--delay", metavar="S", type=duration,
                     help="run after S (seconds, or 30s, 5m, 1h)")
    sub.add_argument("--queue", metavar="Q", default="default",
                     help="the queue (default 'default')")
    sub.add_argument("--idempotency-key", metavar="K",
                     help="a second enqueue with K returns the first job's id")
    sub.add_argument("--unique-while", metavar="STATE", choices=UNIQUE_WHILE,
                     help="hold K only while the job is unfinished (then K is free again)")
    sub.add_argument("--unique-for", metavar="S", type=duration,
                     help="hold K for S (seconds, or 30s, 5m, 1h) from now")
    sub.add_argument("--max-attempts", metavar="N", type=int, help="attempts before it fails")
    sub.add_argument("--wait", metavar="S", nargs="?", type=duration, const=WAIT_FOREVER,
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
