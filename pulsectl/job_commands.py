"""The commands on jobs and queues: straight to the database (they work
while the daemon is down)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pulsectl import bulk, render
from pulsectl.context import (WAIT_FOREVER, CommandFailed, UsageError, config_of,
                              console, database_connection, first_set, json_text, output,
                              print_json, store_of)
from pulsed import serialize
from pulsed.api import enqueue, job_params
from pulsed.job_input import check_text
from pulsed.db.store import Store
from pulsed.errors import EXIT_FAILURE, EXIT_OK, JobInputError
from pulsed.jobs import CANCELLABLE_STATES, RETRYABLE_STATES
from pulsed.output import printable
from pulsed.waiting import wait

# enqueue's keyword -> the option that sets it, for error messages
ENQUEUE_OPTIONS = {"type": "TYPE", "payload": "PAYLOAD_JSON", "priority": "--priority",
                   "delay": "--delay", "queue": "--queue", "max_attempts": "--max-attempts",
                   "idempotency_key": "--idempotency-key", "timeout": "[types] timeout",
                   "unique_while": "--unique-while", "unique_for": "--unique-for"}


def cmd_queue(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        raise UsageError(f"queue {args.action}: name the queue, e.g. `pulsectl queue "
                         f"{args.action} default`")
    if args.action == "pause":  # resume takes any name: one stored before this check goes
        try:  # a name no job can have (a newline, 100,000 characters) was stored as paused
            check_text("queue", args.name)
        except JobInputError as exc:
            raise UsageError(f"queue {args.action}: the queue name {exc.problem}") from None
    with store_of(args) as store:
        if args.action == "pause":
            store.pause_queue(args.name)
        elif args.action == "resume":
            store.resume_queue(args.name)
        paused = store.paused_queues()
    messages = {"pause": f"queue {args.name} paused on every host",
                "resume": f"queue {args.name} resumed",
                "list": "paused queues: " + (", ".join(paused) or "none")}
    output(args, {"paused": paused}, lambda: messages[args.action])
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    with store_of(args) as store:
        records, next_after = store.list_jobs_page(state=args.state, type=args.type,
                                                   limit=args.limit)
    jobs = [serialize.job_to_dict(r) for r in records]
    if args.json:
        print_json({"jobs": jobs, "next_after": next_after})
    elif not jobs:
        console().print("no jobs", style="dim")
    else:
        console().print(render.jobs_table(jobs))
        if len(jobs) == args.limit:
            console().print(f"showing the newest {args.limit}; --limit shows more", style="dim")
        elif next_after is not None:
            console().print(f"showing the newest {len(jobs)}: their payloads and results fill "
                            "a page (16 MiB); GET /jobs?after= pages on", style="dim")
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    with store_of(args) as store:
        record = store.get_job(args.id)
    if record is None:
        raise CommandFailed(f"no job with id {args.id}")
    job = serialize.job_to_dict(record)
    output(args, job, lambda: render.job_view(job))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    if args.id is None or args.dry_run:
        return _bulk(args, "cancel")
    return _change(args, Store.cancel, "cancelled", "cancelled", CANCELLABLE_STATES)


def cmd_retry(args: argparse.Namespace) -> int:
    if args.id is None or args.dry_run:
        return _bulk(args, "retry")
    return _change(args, Store.retry, "retried", "will run again (available now)",
                   RETRYABLE_STATES)


def cmd_delete(args: argparse.Namespace) -> int:
    return _bulk(args, "delete")


def _bulk(args: argparse.Namespace, action: str) -> int:
    """By filter, or one job by ID (delete, --dry-run): pulsectl/bulk.py."""
    try:
        return bulk.run(args, action, store_of, output)
    except bulk.BulkUsageError as exc:
        raise UsageError(str(exc)) from None
    except bulk.BulkNothingToDo as exc:
        raise CommandFailed(str(exc)) from None


def _change(args: argparse.Namespace, action: Callable[[Store, int], bool], verb: str,
            done: str, allowed: Sequence[str]) -> int:
    if bulk.has_filter(args):
        raise UsageError("give a job ID or a filter, not both")
    with store_of(args) as store:
        changed = action(store, args.id)
        record = store.get_job(args.id, with_attempts=False)
    if record is None:
        raise CommandFailed(f"no job with id {args.id}")
    if not changed:
        raise CommandFailed(f"job {args.id} is {record.state.value}; only "
                            f"{', '.join(allowed[:-1])} or {allowed[-1]} jobs can be {verb}")
    job = serialize.job_to_dict(record)
    output(args, job, lambda: f"job {args.id} {done}")
    return EXIT_OK


def cmd_enqueue(args: argparse.Namespace) -> int:
    config = config_of(args)
    defaults = config.type_config(args.type)
    options = {
        "type": args.type, "payload": args.payload, "queue": args.queue,
        "priority": first_set(args.priority, defaults.priority, 0),
        "delay": args.delay, "idempotency_key": args.idempotency_key,
        "max_attempts": first_set(args.max_attempts, defaults.max_attempts),
        "timeout": defaults.timeout,
        "unique_while": args.unique_while, "unique_for": args.unique_for,
    }
    try:
        job_params(**options)  # every argument checked before connecting
    except JobInputError as exc:
        option = ENQUEUE_OPTIONS.get(exc.argument, exc.argument)
        raise UsageError(f"enqueue {option}: {exc.problem}") from None
    with database_connection(config) as conn:
        with conn.transaction():
            job_id = enqueue(conn, **options)
            record = Store(conn).get_job(job_id, with_attempts=False) if args.json else None
        if args.wait is not None:
            return _wait_and_print(args, conn, job_id)
    if record is not None:
        print_json(serialize.job_to_dict(record))
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
        print_json(serialize.job_to_dict(record))
    elif completed:
        print(json_text(record.result) if record.result is not None else job_id)
    else:
        error = printable(record.last_error, lines=True) if record.last_error \
            else "(no error recorded)"
        print(f"job {job_id} {record.state.value}: {error}", file=sys.stderr)
    return EXIT_OK if completed else EXIT_FAILURE
