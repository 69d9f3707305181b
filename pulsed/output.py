"""A worker's stdout and stderr: what a handler prints names its job.

Handlers `print()` (and libraries write to stderr); in the daemon's log those
lines would come from nowhere. While a job runs, every line its thread
writes begins with ``[type#id] ``, as the process title names the job.
Log records do not pass through here: the log handler holds the original
stream, and its lines carry the role and pid already.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TextIO

from pulsed.jobs import Job


class JobTaggedStream:
    """Wraps a text stream; lines written while ``current_job()`` names a
    job are prefixed with it. Only ``write`` changes; the rest is the
    stream's (fileno, isatty, encoding, ...), so nothing that inspects
    sys.stdout breaks."""

    def __init__(self, stream: TextIO, current_job: Callable[[], Job | None]) -> None:
        self._stream = stream
        self._current_job = current_job
        self._line_start = True  # the next character begins a line
        self._lock = threading.Lock()  # handler threads share the stream

    def write(self, text: str) -> int:
        job = self._current_job() if text else None
        with self._lock:
            out = text if job is None else _tagged(text, f"[{job.type}#{job.id}] ",
                                                   self._line_start)
            self._stream.write(out)
            if text:
                self._line_start = text.endswith("\n")
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _tagged(text: str, tag: str, line_start: bool) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(tag + line if index or line_start else line
                   for index, line in enumerate(lines))
