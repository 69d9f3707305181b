"""The multiprocess metrics directory: where each process's metric files
live, and the compaction of a reaped child's files into the archive, under
the lock that scrapes share (see pulsed.metrics)."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
DIR_NAME = "metrics"  # under the state directory
LOCK_NAME = ".lock"  # scrapes hold it shared, compaction exclusive (not *.db)
ARCHIVE = "archive"  # the "pid" part of the archive files' names
ADDITIVE_KINDS = ("counter", "histogram", "summary")  # what the archive keeps
LOCK_WAIT_S = 0.2  # the most a reap waits for scrapes in progress
LOCK_POLL_S = 0.005


def multiproc_dir() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


_pending: set[int] = set()  # reaped pids whose files wait for the lock


def forget_reaped() -> None:
    """A fresh directory: no reaped pid's files wait for compaction."""
    _pending.clear()


def child_reaped(pid: int) -> None:
    """The master reaped `pid`: fold its counters into the archive and
    delete its files. If scrapes hold the lock for long, the pid waits for
    the next reap."""
    path = multiproc_dir()
    if path is None:
        return
    _pending.add(pid)
    try:
        with _locked(path, exclusive=True, wait=LOCK_WAIT_S) as locked:
            if not locked:
                log.debug("metrics: scrapes in progress; pid(s) %s compacted later",
                          sorted(_pending))
                return
            for dead in sorted(_pending):
                if not _is_our_child(dead):  # a child reusing the pid keeps its file
                    compact_pid(path, dead)
            _pending.clear()
    except OSError as exc:
        log.warning("metrics: could not compact the files of pid %d: %s", pid, exc)


def compact_pid(path: Path, pid: int) -> None:
    """Add a dead process's counters, histograms and summaries into the
    archive files and remove all its files. Call with the lock held."""
    for name in sorted(glob.glob(str(path / f"*_{pid}.db"))):
        kind = os.path.basename(name).split("_")[0]
        if kind in ADDITIVE_KINDS:
            archive = reserving_dict()(str(path / f"{kind}_{ARCHIVE}.db"))
            try:
                for key, value, _ts, _pos in _readable_values(name):
                    old, _ = archive.read_value(key)
                    archive.write_value(key, old + value, 0.0)
            finally:
                archive.close()
        os.unlink(name)  # gauges: live ones die with the process (mark_process_dead)


_reserving_dict: Any = None


def reserving_dict() -> Any:
    """prometheus_client's MmapedDict, with the disk blocks of its file
    reserved (posix_fallocate) before they are mapped. prometheus_client
    grows a file with truncate(), which on a full filesystem (a tmpfs state
    dir, say) makes a sparse file: the first store into a page with no
    block behind it is a SIGBUS, and the master died of one, silently,
    taking every child with it. Reserved, a full disk is an OSError where
    the file is made or grown, which the metric hooks drop."""
    global _reserving_dict
    if _reserving_dict is None:
        from prometheus_client import mmap_dict

        class ReservingDict(mmap_dict.MmapedDict):  # type: ignore[misc]
            def __init__(self, filename: str, read_mode: bool = False) -> None:
                if not read_mode:
                    _reserve(filename, getattr(mmap_dict, "_INITIAL_MMAP_SIZE", 1 << 20))
                super().__init__(filename, read_mode)

            def _init_value(self, key: str) -> None:
                # The entry's size as the base class packs it. Its private
                # fields may change in a later prometheus_client: then grow
                # as it does (sparse), rather than drop every update.
                size = 4 + len(key.encode("utf-8")) + 16
                size += 8 - size % 8 if size % 8 else 8
                try:
                    used, capacity, fileno = self._used, self._capacity, self._f.fileno()
                except AttributeError:
                    used = capacity = fileno = None
                if capacity is not None:
                    grown = capacity
                    while used + size > grown:
                        grown *= 2
                    if grown != capacity:
                        os.posix_fallocate(fileno, 0, grown)
                super()._init_value(key)

        _reserving_dict = ReservingDict
    return _reserving_dict


def _reserve(filename: str, initial: int) -> None:
    fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.posix_fallocate(fd, 0, max(os.fstat(fd).st_size, initial))
    finally:
        os.close(fd)


def use_reserving_dict() -> None:
    """Make prometheus_client's multiprocess values map their files through
    reserving_dict() (they look MmapedDict up in their module at each
    file they open)."""
    from prometheus_client import values

    values.MmapedDict = reserving_dict()


# What reading a metric file may raise: a damaged file, or one a process
# is creating at that moment (still empty: struct.error on its header).
_UNREADABLE_FILE = (RuntimeError, ValueError, UnicodeDecodeError, OSError, struct.error)


def _readable_values(name: str) -> list[tuple[str, float, float, int]]:
    from prometheus_client.mmap_dict import MmapedDict

    try:
        return list(MmapedDict.read_all_values_from_file(name))
    except _UNREADABLE_FILE as exc:
        log.warning("metrics: %s is unreadable (%s); its counts are dropped", name, exc)
        return []


def _is_our_child(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and int(fields[1]) == os.getpid()


@contextlib.contextmanager
def _locked(path: Path, *, exclusive: bool, wait: float | None = None) -> Iterator[bool]:
    """flock the directory's lock file (shared or exclusive); with `wait`,
    give up after that long and yield False."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        yield _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait)
    finally:
        os.close(fd)  # closing releases the lock


def _flock(fd: int, mode: int, wait: float | None) -> bool:
    if wait is None:
        fcntl.flock(fd, mode)
        return True
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_S)
