"""The commands that talk to a running pulsed over its control socket."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pulsectl import render
from pulsectl.context import CommandFailed, client_of, console, output
from pulsed.control.protocol import MAX_LOG_LINES, TIMEOUT, ControlError
from pulsed.errors import EXIT_OK
from pulsed.output import printable

FOLLOW_POLL_S = 0.5  # logs --follow asks the daemon for new lines this often


def cmd_status(args: argparse.Namespace) -> int:
    status = client_of(args).request("status")
    output(args, status, lambda: render.status_view(status))
    return EXIT_OK


def cmd_scale(args: argparse.Namespace) -> int:
    result = client_of(args).request("scale", workers=args.workers)
    output(args, result, lambda: f"workers: {result.get('workers')}")
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    if not args.wait:
        result = client_of(args).request("drain")
        output(args, result, lambda: "draining: no new jobs are claimed on this node "
                                      "(`pulsectl resume` undoes it)")
        return EXIT_OK
    if not args.json:
        console(stderr=True).print("draining; waiting for running jobs to finish…")
    try:  # the client waits as long as the daemon does, plus a margin
        result = client_of(args).request("drain", wait=True, timeout=args.timeout)
    except ControlError as exc:
        if exc.code != TIMEOUT:
            raise
        raise CommandFailed(f"drain --wait timed out: {exc.message}") from None
    output(args, result, lambda: f"drained: no job is running on this node (waited "
                                  f"{render.format_duration(result.get('waited_s'))})")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    result = client_of(args).request("resume")
    output(args, result, lambda: _with_state("resumed: claiming jobs again", result))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    result = client_of(args).request("reload")
    output(args, result, lambda: _with_state("reloading the config; workers are replaced "
                                              "gracefully", result))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    result = client_of(args).request("stop", now=args.now)
    message = "stopping now" if args.now else "stopping: running jobs may finish first"
    output(args, result, lambda: _with_state(message, result))
    return EXIT_OK


def cmd_restart(args: argparse.Namespace) -> int:
    index = args.index if args.index is not None else (1 if args.role == "worker" else 0)
    result = client_of(args).request("restart", role=args.role, index=index)
    output(args, result, lambda: f"restarting {args.role} {index} (pid {result.get('pid')}): "
                                  "a new one takes its place once its jobs finish")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    client = client_of(args)
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
    not rich markup, and control characters are shown escaped: a handler's
    output or a job's error with ESC or CR in it would drive the terminal,
    or overwrite the prefix and pass for another process's line); with
    --json, each line as a JSON object."""
    for line in result.get("lines") or []:
        sys.stdout.write(json.dumps(line) if args.json else
                         f"{line.get('role')} {line.get('index')} | "
                         f"{printable(str(line.get('text')))}")
        sys.stdout.write("\n")
    sys.stdout.flush()


def _with_state(message: str, result: dict[str, Any]) -> str:
    return f"{message} (state: {result['state']})" if result.get("state") else message
