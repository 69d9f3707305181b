"""pulsectl retry|cancel|delete by filter (issue 19): every matching job,
in batches (pulsed.db.browse), after showing the count and asking, unless
--yes; --dry-run prints the count only. Registered by cli.py on its retry
and cancel commands (which keep taking one job's ID) and as `delete`."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from pulsectl.arguments import duration
from pulsed.db import browse
from pulsed.db.browse import JobFilter
from pulsed.db.store import Store
from pulsed.jobs import JobState

StoreOpener = Callable[[argparse.Namespace], AbstractContextManager[Store]]
Output = Callable[[argparse.Namespace, Any, Callable[[], Any]], None]


class BulkUsageError(ValueError):
    """The filter given on the command line is wrong."""


class BulkNothingToDo(LookupError):
    """The job named by its ID does not exist, or is in no state the action takes."""


def _why_not(store: Store, action: str, job_id: int) -> str:
    record = store.get_job(job_id, with_attempts=False)
    if record is None:
        return f"no job with id {job_id}"
    allowed = browse.ACTION_STATES[action]
    return (f"job {job_id} is {record.state.value}; only {', '.join(allowed[:-1])} or "
            f"{allowed[-1]} jobs can be {_past(action)}")


def add_filter_arguments(sub: argparse.ArgumentParser) -> None:
    group = sub.add_argument_group("every job matching a filter (instead of ID)")
    group.add_argument("--state", choices=[s.value for s in JobState], help="only this state")
    group.add_argument("--type", metavar="T", help="only this job type")
    group.add_argument("--queue", metavar="Q", help="only this queue")
    group.add_argument("--older-than", metavar="D", type=duration,
                       help="finished (or, if not finished, created) more than D ago: 90s, 2h, 7d")
    group.add_argument("--error", metavar="TEXT", help="last error contains TEXT (any case)")
    group.add_argument("--dry-run", action="store_true", help="print how many jobs match; change none")
    group.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def job_filter(args: argparse.Namespace) -> JobFilter:
    return JobFilter(state=args.state, type=args.type, queue=args.queue,
                     older_than=args.older_than, error=args.error)


def has_filter(args: argparse.Namespace) -> bool:
    return not job_filter(args).is_empty()


def run(args: argparse.Namespace, action: str, open_store: StoreOpener, output: Output) -> int:
    """The command: count, confirm, apply. Returns the exit status."""
    flt = job_filter(args)
    if args.id is not None and not flt.is_empty():
        raise BulkUsageError(f"{action}: give a job ID or a filter, not both")
    if args.id is not None:
        flt = JobFilter(id=args.id)
    elif flt.is_empty():
        raise BulkUsageError(f"{action} needs a job ID or a filter (--state, --type, --queue, "
                             "--older-than, --error); refusing to act on every job")
    with open_store(args) as store:
        count = browse.bulk_count(store, action, flt)
        if count == 0 and args.id is not None:
            raise BulkNothingToDo(_why_not(store, action, args.id))
        if args.dry_run:
            output(args, {"action": action, "dry_run": True, "matched": count,
                          "filter": flt.describe()},
                   lambda: f"{count} jobs would be {_past(action)} ({flt.describe()})")
            return 0
        if count == 0:
            output(args, {"action": action, "dry_run": False, "matched": 0, "changed": 0,
                          "filter": flt.describe()},
                   lambda: f"no job matches ({flt.describe()}); nothing {_past(action)}")
            return 0
        named = args.id is not None  # one job named by its ID: no question
        if not (args.yes or named) and not _confirm(f"{action} {count} jobs ({flt.describe()})? [y/N] "):
            print("nothing changed", file=sys.stderr)
            return 1
        who = f"pulsectl:{getpass.getuser()}"
        result = browse.bulk_apply(store, action, flt, who=who)
    data = {"action": action, "dry_run": False, "by": who, "matched": result.matched,
            "changed": result.changed, "skipped": result.skipped, "batches": result.batches,
            "filter": flt.describe()}
    output(args, data, lambda: f"{result.changed} jobs {_past(action)}"
           + (f" ({result.skipped} matched but changed meanwhile or locked)" if result.skipped else ""))
    # one job named by its ID and not changed (it changed meanwhile): as a missing one
    return 1 if args.id is not None and result.changed == 0 else 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise BulkUsageError("not asking on a non-interactive stdin: pass --yes (or --dry-run)")
    return input(question).strip().lower() in ("y", "yes")


def _past(action: str) -> str:
    return {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}[action]
