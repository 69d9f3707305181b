"""Text for people: job data made safe to print (printable()), and a
worker's stdout and stderr, where what a handler prints names its job.

Handlers `print()` (and libraries write to stderr); in the daemon's log those
lines would come from nowhere. While a job runs, every line its thread
writes begins with ``[type#id] ``, as the process title names the job.
Log records do not pass through here: the log handler holds the original
stream, and its lines carry the role and pid already.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, TextIO

from pulsed.jobs import Job

# Characters that drive a terminal instead of showing: C0 controls (ESC
# begins the sequences that clear the screen, make OSC 8 links and write the
# clipboard with OSC 52; CR and BS overwrite what came before, so a log line
# or table row can be forged), DEL, C1 controls (U+009B is a CSI by itself),
# and the bidi controls that reorder what follows on terminals that do bidi.
# Job types, errors, tracebacks, payloads and results come from applications
# and HTTP clients; rich strips only BEL, BS, VT, FF and CR of them.
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x08\x0a-\x1f\x7f-\x9f{_BIDI}]")  # tab is kept
_UNSAFE_IN_LINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")  # newline too
_NAMED = {"\n": "\\n", "\r": "\\r"}


def printable(text: str, *, lines: bool = False) -> str:
    """`text` with every such character shown escaped (\\x1b, \\r, \\u202e),
    as `ls -b` and systemctl show them: for human-facing output only
    (--json and the HTTP API keep the text exact). A newline is escaped
    too, so the text stays one line, unless `lines` (tracebacks,
    multi-line error messages)."""
    if text.isascii() and text.isprintable():  # nearly all text: checked in C
        return text
    return (_UNSAFE_IN_LINES if lines else _UNSAFE).sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    char = match[0]
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


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
