"""The master's ring of its children's recent log lines (`pulsectl logs`).

Each child's stderr is a pipe to the master. The master reads it in its
selectors loop, keeps the last RING_LINES complete lines of each (role,
index) place, and passes every line on to its own stderr (journald, the
log file), whole: lines of two children never interleave mid-line. A place
keeps its ring across restarts, so the lines before a crash stay readable
after it. Memory is bounded: RING_LINES lines a place, each cut at
MAX_LINE_BYTES, and RING_BYTES in all (the oldest lines of any place go
first). If the master dies, its children's writes to stderr fail (EPIPE)
until they notice and exit, within seconds.

A line gets a sequence number, increasing across all places, so a client
that follows (`--follow`) asks for what came after the last one it saw.

A place holds the lines of each read together, as bytes, and makes them
text only when `pulsectl logs` asks: a busy worker writes a few hundred job
lines a read, and a LogLine per line cost the master ~1.3 us a job (W1).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import selectors
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

log = logging.getLogger(__name__)

RING_LINES = 1000  # lines kept per (role, index) place
RING_BYTES = 16 * 1024 * 1024  # text kept over every place (1,024 workers' rings would not fit)
MAX_LINE_BYTES = 4096  # a longer line is cut (a partial line waits up to this for its end)
READ_BYTES = 65536
PIPE_BYTES = 1 << 20  # a bigger pipe: a child's logging does not block while the master is busy
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
CUT_MARK = " [cut]"
_CUT_BYTES = CUT_MARK.encode()
WRITE_WAIT_S = 1.0  # a full non-blocking stderr is waited on this long at a time


class LogLine(NamedTuple):
    seq: int
    role: str
    index: int
    text: str


@dataclass
class _Source:
    role: str
    index: int
    partial: bytes = b""


class _Chunk(NamedTuple):
    """The complete lines of one read, in order: the first has sequence
    number `first`, the next first + 1, and so on."""

    first: int
    lines: list[bytes]  # without their newlines; a cut one ends in CUT_MARK
    size: int  # their bytes


@dataclass
class _Place:
    """One (role, index) place's ring: its newest lines, oldest first."""

    chunks: deque[_Chunk] = field(default_factory=deque)
    lines: int = 0

    def drop_first(self, count: int) -> int:
        """Drop the oldest `count` lines (at most those of the oldest
        chunk); the bytes freed."""
        chunk = self.chunks[0]
        if count >= len(chunk.lines):
            self.chunks.popleft()
            self.lines -= len(chunk.lines)
            return chunk.size
        freed = sum(map(len, chunk.lines[:count]))
        self.chunks[0] = _Chunk(chunk.first + count, chunk.lines[count:], chunk.size - freed)
        self.lines -= count
        return freed

    def newest(self, count: int, after: int | None) -> list[tuple[int, bytes]]:
        """Up to `count` of its newest lines after sequence `after`, as
        (seq, line), oldest first."""
        found: list[tuple[int, bytes]] = []
        for chunk in reversed(self.chunks):
            start = max(0, len(chunk.lines) - (count - len(found)))
            if after is not None:
                start = max(start, after + 1 - chunk.first)
            found[:0] = [(chunk.first + i, chunk.lines[i]) for i in range(start, len(chunk.lines))]
            if start > 0 or len(found) >= count:
                break
        return found


class LogRing:
    def __init__(self, *, write_through: int | None = 2, lines: int = RING_LINES,
                 max_bytes: int = RING_BYTES) -> None:
        self._write_through = write_through  # the fd lines are passed on to (None: kept only)
        self._lines = lines
        self._max_bytes = max_bytes
        self._bytes = 0  # line bytes held over every place
        self._places: dict[tuple[str, int], _Place] = {}
        self._sources: dict[int, _Source] = {}  # read end -> its child's place
        self._seq = 0
        self._selector: selectors.BaseSelector | None = None

    # -- the master's side ------------------------------------------------------------

    def pipe(self) -> tuple[int, int]:
        """A new (read, write) pair for a child's stderr, made before the fork."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size for this user: the default then
        os.set_blocking(read_fd, False)
        return read_fd, write_fd

    def watch(self, selector: selectors.BaseSelector, read_fd: int, write_fd: int,
              role: str, index: int) -> None:
        """After the fork: the child holds the write end; read the other."""
        os.close(write_fd)
        self._selector = selector
        self._sources[read_fd] = _Source(role, index)
        selector.register(read_fd, selectors.EVENT_READ, lambda: self.read(read_fd))

    def reads_from(self, fd: int) -> bool:
        """Whether fd is the read end of a child's stderr pipe."""
        return fd in self._sources

    def read(self, fd: int) -> None:
        """Take what the child wrote; at EOF (it exited) stop watching."""
        source = self._sources.get(fd)
        if source is None:
            return
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return
            data = b""
        if not data:
            self._close(fd, source)
            return
        self._take(source, source.partial + data)

    def _take(self, source: _Source, data: bytes) -> None:
        *lines, rest = data.split(b"\n")
        while len(rest) > MAX_LINE_BYTES:
            lines.append(rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        source.partial = rest
        if lines:
            self._add(source, lines)

    def _add(self, source: _Source, lines: list[bytes]) -> None:
        if not lines:
            return
        kept = lines
        if max(map(len, lines)) > MAX_LINE_BYTES:  # cut in the ring, passed on whole
            kept = [raw if len(raw) <= MAX_LINE_BYTES else raw[:MAX_LINE_BYTES] + _CUT_BYTES
                    for raw in lines]
        place = self._places.get((source.role, source.index))
        if place is None:
            place = self._places[(source.role, source.index)] = _Place()
        size = sum(map(len, kept))
        place.chunks.append(_Chunk(self._seq + 1, kept, size))
        place.lines += len(kept)
        self._seq += len(kept)
        self._bytes += size
        while place.lines > self._lines:
            self._bytes -= place.drop_first(place.lines - self._lines)
        while self._bytes > self._max_bytes:
            self._drop_oldest()
        if self._write_through is not None:
            _write_all(self._write_through, b"\n".join(lines) + b"\n")

    def _drop_oldest(self) -> None:
        """Drop the oldest lines of all places, as many as put the total
        back within budget or the whole of its chunk."""
        place = min((p for p in self._places.values() if p.chunks),
                    key=lambda p: p.chunks[0].first)
        over, count = self._bytes - self._max_bytes, 0
        for raw in place.chunks[0].lines:
            if over <= 0:
                break
            over -= len(raw)
            count += 1
        self._bytes -= place.drop_first(max(count, 1))

    def _close(self, fd: int, source: _Source) -> None:
        if source.partial:
            self._add(source, [source.partial])
            source.partial = b""
        del self._sources[fd]
        if self._selector is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass
        os.close(fd)

    def drain(self) -> None:
        """Read every pipe until it has nothing more (the master's last tick)."""
        for fd in list(self._sources):
            while fd in self._sources:
                before = self._seq, self._sources[fd].partial
                self.read(fd)
                if fd in self._sources and (self._seq, self._sources[fd].partial) == before:
                    break

    def close_in_child(self) -> None:
        """In a freshly forked child: the master's read ends are not its own."""
        for fd in self._sources:
            try:
                os.close(fd)
            except OSError:
                pass
        self._sources = {}

    # -- what `pulsectl logs` reads ------------------------------------------------------

    def tail(self, *, role: str | None = None, index: int | None = None, lines: int = 100,
             after: int | None = None) -> list[LogLine]:
        """The last `lines` lines of one place (or of every place matching
        role / index), oldest first; with `after`, only newer ones."""
        if lines <= 0:
            return []
        found = [LogLine(seq, r, i, raw.decode("utf-8", "replace"))
                 for (r, i), place in self._places.items()
                 if (role is None or r == role) and (index is None or i == index)
                 for seq, raw in place.newest(lines, after)]
        found.sort(key=lambda line: line.seq)
        return found[-lines:]

    @property
    def last_seq(self) -> int:
        return self._seq


def to_stderr(write_fd: int) -> None:
    """In a child: its stderr (fd 2) becomes the pipe to the master's ring."""
    os.dup2(write_fd, 2)
    os.close(write_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:  # a non-blocking stderr that is full: wait, as a child did
            select.select([], [fd], [], WRITE_WAIT_S)
            continue
        except OSError:
            return  # stderr is gone: the ring still has the lines
        view = view[written:]
