"""The status board: a shared memory page the master and its children share.

The master maps it before forking; each child writes its own slot (state,
heartbeat, jobs done, and a table of the jobs it has started) with plain
memory stores, so reporting costs no system call per job. The master reads
every slot each tick. A per-slot sequence counter (a seqlock) keeps the
master from reading a half-written slot. The header carries node-wide flags
the master sets (drain) that every worker reads before it claims.

The job table is what makes a worker's death accountable: it lists every job
the worker started and has not yet written an outcome for (running, or
finished with its completion still waiting for the next batch), each with
its deadline. When the worker dies the master reads it to record an attempt
for exactly those jobs, and gives back the jobs the worker claimed but never
started (they are not in the table).
"""

from __future__ import annotations

import enum
import logging
import math
import mmap
import struct
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

log = logging.getLogger(__name__)

MAX_SLOTS = 512
# The most worker processes one pulsed runs (daemon.workers and scale refuse more):
# a reload briefly runs two generations side by side, beside the other children.
MAX_WORKERS = MAX_SLOTS // 2 - 4
TEXT_BYTES = 200
# Started, unwritten jobs one worker can list: running ones (at most
# worker.concurrency, which the config caps well below this) plus finished
# ones whose completions wait for the next batch (the worker writes them
# before the table fills: see FLUSH_AT_ENTRIES).
MAX_SLOT_JOBS = 1024
FLUSH_AT_ENTRIES = MAX_SLOT_JOBS // 2
JOB_TYPE_BYTES = 40

_HEADER = struct.Struct("<q q")  # drain flag, reserved
# seq, pid, role, index, state, heartbeat, jobs_done, term, rss_bytes,
# table high-water mark, restarts of this (role, index) so far (the master
# writes it before fork; the scheduler puts it in the process registry),
# message (text: boot error, or why a worker cannot reach the database)
_FIXED = struct.Struct(f"<q q 16s q q d q q q q q {TEXT_BYTES}s")
# job id, started (monotonic), deadline (monotonic, NaN: none), flags, type
_ENTRY = struct.Struct(f"<q d d q {JOB_TYPE_BYTES}s")
_SLOT_SIZE = _FIXED.size + _ENTRY.size * MAX_SLOT_JOBS
_SEQ = struct.Struct("<q")
_INT = struct.Struct("<q")
# Where single fixed fields live, for the per-job writes (a whole fixed
# part, message and all, is packed only for rare updates).
_STATE_AT = struct.calcsize("<q q 16s q")
_DONE_AT = struct.calcsize("<q q 16s q q d")
_HWM_AT = struct.calcsize("<q q 16s q q d q q q")
# An entry's deadline and flags, rewritten when its handler returns.
_DEADLINE_FLAGS = struct.Struct("<d q")
_DEADLINE_AT = struct.calcsize("<q d")
NO_JOB = -1
READ_RETRIES = 100
_NAN = math.nan
MAX_CACHED_TYPES = 1024  # job types a reader keeps decoded (then it starts over)

(_SEQ_I, _PID, _ROLE, _INDEX, _STATE, _HEARTBEAT, _DONE, _TERM, _RSS, _HWM, _RESTARTS,
 _MESSAGE) = range(12)


class ChildState(enum.IntEnum):
    """A child's state as it reports it (the master adds backoff/stopping)."""

    STARTING = 0
    IDLE = 1
    BUSY = 2
    DRAINING = 3
    STOPPING = 4
    BOOT_FAILED = 5


# A child in one of these is doing its work (for a worker: taking jobs)
SERVING_STATES = frozenset({ChildState.IDLE, ChildState.BUSY, ChildState.DRAINING})


class EntryFlag(enum.IntEnum):
    RUNNING = 1  # its handler runs
    FINISHED = 2  # its handler returned; the completion is not written yet


_RUNNING, _FINISHED, _BUSY = int(EntryFlag.RUNNING), int(EntryFlag.FINISHED), int(ChildState.BUSY)


class JobEntry(NamedTuple):
    """One started job in a worker's table."""

    job_id: int
    job_type: str
    started: float
    deadline: float | None
    running: bool  # False: finished, completion not yet written


@dataclass(frozen=True)
class SlotView:
    pid: int
    role: str  # "" for a free slot
    index: int
    state: ChildState
    heartbeat: float
    jobs_done: int
    term: int
    rss_bytes: int
    message: str
    # The job table as read (consistent with the fields above), decoded on
    # use: during a drain it holds up to FLUSH_AT_ENTRIES finished jobs, and
    # the master's tick reads every slot a few times but wants only the
    # running ones (as objects, ~0.6 ms a slot a read: half the master's CPU
    # in a drain, W1). A dead worker's whole table is decoded once.
    table: bytes = field(default=b"", repr=False)
    restarts: int = 0  # the master's count for this (role, index), as of the fork

    @cached_property
    def jobs(self) -> tuple[JobEntry, ...]:
        """Started, not yet written: running, or finished with the
        completion still to send."""
        return tuple(_entry(*values) for values in _ENTRY.iter_unpack(self.table)
                     if values[0] != NO_JOB)

    @property
    def database_error(self) -> str:
        """Why a running worker cannot reach the database ("" when it can):
        a worker's message outside a boot failure says that."""
        if self.role != "worker" or self.state == ChildState.BOOT_FAILED:
            return ""
        return self.message

    @cached_property
    def running(self) -> list[JobEntry]:
        return [_entry(*values) for values in _ENTRY.iter_unpack(self.table)
                if values[3] == _RUNNING and values[0] != NO_JOB]

    @property
    def _first(self) -> JobEntry | None:
        running = self.running
        return min(running, key=lambda e: e.started) if running else None

    @property
    def job_id(self) -> int | None:
        """The longest-running job (SPEC: `job` is the first of `jobs`)."""
        first = self._first
        return first.job_id if first else None

    @property
    def job_type(self) -> str:
        first = self._first
        return first.job_type if first else ""

    @property
    def job_started(self) -> float | None:
        first = self._first
        return first.started if first else None

    @property
    def job_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self.running if e.deadline is not None]
        return min(deadlines) if deadlines else None


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "replace")


_type_texts: dict[bytes, str] = {}  # job types as stored -> text (a drain repeats a few)


def _entry(job_id: int, started: float, deadline: float, flags: int, job_type: bytes
           ) -> JobEntry:
    text = _type_texts.get(job_type)
    if text is None:
        if len(_type_texts) >= MAX_CACHED_TYPES:
            _type_texts.clear()
        text = _type_texts[job_type] = _text(job_type)
    return JobEntry(job_id, text, started, None if math.isnan(deadline) else deadline,
                    flags == _RUNNING)


class Board:
    def __init__(self, slots: int = MAX_SLOTS) -> None:
        self.slots = slots
        # Anonymous shared memory: pages a slot never writes (most of each
        # job table) are never backed by RAM.
        self._mem = mmap.mmap(-1, _HEADER.size + _SLOT_SIZE * slots)
        self._last: dict[int, SlotView] = {}  # per reader process

    # -- header (written by the master) ---------------------------------------

    @property
    def draining(self) -> bool:
        return bool(_HEADER.unpack_from(self._mem, 0)[0])

    @draining.setter
    def draining(self, value: bool) -> None:
        _HEADER.pack_into(self._mem, 0, int(value), 0)

    # -- slots ------------------------------------------------------------------

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range")
        return _HEADER.size + _SLOT_SIZE * slot

    def reset(self, slot: int, role: str = "", index: int = 0, *, restarts: int = 0) -> None:
        """Master, before fork (or after reaping, with no role): a clean
        slot with an empty job table. The child writes its own pid once it runs."""
        _FIXED.pack_into(self._mem, self._offset(slot), 0, 0, role.encode(), index,
                         ChildState.STARTING, time.monotonic(), 0, 0, 0, 0, restarts, b"")

    def used_slots(self) -> list[SlotView]:
        """Every slot a child occupies (for the node's process registry)."""
        views = (self.read(slot) for slot in range(self.slots))
        return [view for view in views if view.role and view.pid]

    def read(self, slot: int) -> SlotView:
        offset = self._offset(slot)
        for _ in range(READ_RETRIES):
            values = _FIXED.unpack_from(self._mem, offset)
            if values[_SEQ_I] % 2:
                continue
            table = self._table(offset, values[_HWM])
            if _SEQ.unpack_from(self._mem, offset)[0] == values[_SEQ_I]:
                break
        else:  # a writer kept the slot busy: the last consistent view will do
            if slot in self._last:
                return self._last[slot]
            table = b""
        self._last[slot] = view = SlotView(
            values[_PID], _text(values[_ROLE]), values[_INDEX], ChildState(values[_STATE]),
            values[_HEARTBEAT], values[_DONE], values[_TERM], values[_RSS],
            _text(values[_MESSAGE]), table, values[_RESTARTS])
        return view

    def _table(self, offset: int, high_water: int) -> bytes:
        """The job table's used rows, copied (SlotView decodes them)."""
        if not high_water:
            return b""
        start = offset + _FIXED.size
        return self._mem[start:start + _ENTRY.size * min(high_water, MAX_SLOT_JOBS)]

    def writer(self, slot: int) -> "SlotWriter":
        return SlotWriter(self._mem, self._offset(slot))

    def close(self) -> None:
        self._mem.close()


class SlotWriter:
    """A child's handle on its own slot. Every update is one seqlock write:
    the sequence goes odd, the fields are stored, the sequence goes even."""

    def __init__(self, mem: mmap.mmap, offset: int) -> None:
        self._mem = mem
        self._offset = offset
        self._values = list(_FIXED.unpack_from(mem, offset))
        self._where: dict[int, int] = {}  # job id -> its table row
        self._free: list[int] = []  # rows below the high-water mark, free again
        self._lock = threading.Lock()  # the job threads and the monitor thread all write
        self._full_warned = False
        self._types: dict[str, bytes] = {}  # job types as stored (cut to JOB_TYPE_BYTES)

    def update(self, **fields: object) -> None:
        with self._lock:
            self._begin()
            for name, value in fields.items():
                index = _FIELDS[name]
                if name == "message":
                    value = str(value).encode()[:TEXT_BYTES]
                self._values[index] = value
            self._store_fixed()
            self._end()

    def heartbeat(self) -> None:
        self.update(heartbeat=time.monotonic())

    # -- the job table ------------------------------------------------------------

    # job_started and job_finished run once per job (~2.5 us of a drain's
    # ~30 a job when they called the helpers below): written out in full,
    # with the types' bytes cached and the flags as plain ints.

    def job_started(self, job_id: int, job_type: str, started: float,
                    deadline: float | None) -> None:
        encoded = self._types.get(job_type)
        if encoded is None:
            if len(self._types) >= MAX_CACHED_TYPES:
                self._types.clear()
            encoded = self._types[job_type] = job_type.encode()[:JOB_TYPE_BYTES]
        values, mem, offset = self._values, self._mem, self._offset
        with self._lock:
            high_water = values[_HWM]
            row = self._free.pop() if self._free else self._grow()
            if row is None:
                return
            self._where[job_id] = row
            seq = values[_SEQ_I] = values[_SEQ_I] + 1  # odd: readers retry
            _SEQ.pack_into(mem, offset, seq)
            _ENTRY.pack_into(mem, offset + _FIXED.size + row * _ENTRY.size, job_id, started,
                             _NAN if deadline is None else deadline, _RUNNING, encoded)
            if values[_STATE] != _BUSY:
                values[_STATE] = _BUSY
                _INT.pack_into(mem, offset + _STATE_AT, _BUSY)
            if values[_HWM] != high_water:
                _INT.pack_into(mem, offset + _HWM_AT, values[_HWM])
            values[_SEQ_I] = seq + 1
            _SEQ.pack_into(mem, offset, seq + 1)

    def job_finished(self, job_id: int, jobs_done: int) -> None:
        """The handler returned: no deadline any more, outcome not yet written."""
        values, mem, offset = self._values, self._mem, self._offset
        with self._lock:
            row = self._where.get(job_id)
            seq = values[_SEQ_I] = values[_SEQ_I] + 1
            _SEQ.pack_into(mem, offset, seq)
            if row is not None:
                _DEADLINE_FLAGS.pack_into(
                    mem, offset + _FIXED.size + row * _ENTRY.size + _DEADLINE_AT,
                    _NAN, _FINISHED)
            values[_DONE] = jobs_done
            _INT.pack_into(mem, offset + _DONE_AT, jobs_done)
            values[_SEQ_I] = seq + 1
            _SEQ.pack_into(mem, offset, seq + 1)

    def job_deadline(self, job_id: int, deadline: float) -> None:
        """A new deadline for a running job (it was cancelled: its grace)."""
        with self._lock:
            row = self._where.get(job_id)
            if row is None:
                return
            self._begin()
            _DEADLINE_FLAGS.pack_into(self._mem, self._row_offset(row) + _DEADLINE_AT,
                                      deadline, EntryFlag.RUNNING)
            self._end()

    def jobs_cleared(self, job_ids: list[int]) -> None:
        """Their outcomes are in the database: off the table."""
        with self._lock:
            rows = [self._where.pop(job_id) for job_id in job_ids if job_id in self._where]
            if not rows:
                return
            self._begin()
            for row in rows:
                _INT.pack_into(self._mem, self._row_offset(row), NO_JOB)
            self._free.extend(rows)
            if not self._where:  # all free: the table starts over
                self._free.clear()
                self._values[_HWM] = 0
                _INT.pack_into(self._mem, self._offset + _HWM_AT, 0)
            self._end()

    def _grow(self) -> int | None:
        """A new row at the high-water mark (no freed row is left)."""
        row = self._values[_HWM]
        if row >= MAX_SLOT_JOBS:
            if not self._full_warned:
                log.warning("the status board's job table is full (%d jobs started and not "
                            "written); a crash now loses the accounting of the newest",
                            MAX_SLOT_JOBS)
                self._full_warned = True
            return None
        self._values[_HWM] = row + 1
        return row

    # -- seqlock writes -------------------------------------------------------------

    def _begin(self) -> None:
        self._values[_SEQ_I] += 1  # odd: a write is in progress, readers retry
        _SEQ.pack_into(self._mem, self._offset, self._values[_SEQ_I])

    def _end(self) -> None:
        self._values[_SEQ_I] += 1
        _SEQ.pack_into(self._mem, self._offset, self._values[_SEQ_I])

    def _store_fixed(self) -> None:
        # Everything after the sequence word; slice assignment is a plain
        # copy (struct.pack_into would first zero the range).
        packed = _FIXED.pack(*self._values)
        self._mem[self._offset + 8:self._offset + _FIXED.size] = packed[8:]

    def _row_offset(self, row: int) -> int:
        return self._offset + _FIXED.size + row * _ENTRY.size


_FIELDS = {"pid": _PID, "role": _ROLE, "index": _INDEX, "state": _STATE,
           "heartbeat": _HEARTBEAT, "jobs_done": _DONE, "term": _TERM, "rss_bytes": _RSS,
           "message": _MESSAGE}
