"""The status board: a shared memory page the master and its children share.

The master maps it before forking; each child writes its own slot (state,
current job, heartbeat, jobs done) with plain memory stores, so reporting
costs no system call per job. The master reads every slot each tick. A
per-slot sequence counter (a seqlock) keeps the master from reading a
half-written slot. The header carries node-wide flags the master sets
(drain) that every worker reads before it claims.
"""

from __future__ import annotations

import enum
import math
import mmap
import struct
import threading
import time
from dataclasses import dataclass

MAX_SLOTS = 512
TEXT_BYTES = 200

_HEADER = struct.Struct("<q q")  # drain flag, reserved
# seq, pid, role, index, state, job_id, job_started, job_deadline, heartbeat,
# jobs_done, term, rss_bytes, job_type (text), message (text: boot error)
_SLOT = struct.Struct(f"<q q 16s q q q d d d q q q 64s {TEXT_BYTES}s")
NO_JOB = -1
READ_RETRIES = 100
# The per-job fields are contiguous (state .. jobs_done, heartbeat between):
# a worker rewrites just that range for each job, not the whole slot.
_JOB_FIELDS = struct.Struct("<q q d d d q")
_JOB_FIELDS_AT = struct.calcsize("<q q 16s q")
_JOB_TYPE = struct.Struct("<64s")
_JOB_TYPE_AT = struct.calcsize("<q q 16s q q q d d d q q q")
_SEQ = struct.Struct("<q")


class ChildState(enum.IntEnum):
    """A child's state as it reports it (the master adds backoff/stopping)."""

    STARTING = 0
    IDLE = 1
    BUSY = 2
    DRAINING = 3
    STOPPING = 4
    BOOT_FAILED = 5


@dataclass(frozen=True)
class SlotView:
    pid: int
    role: str  # "" for a free slot
    index: int
    state: ChildState
    job_id: int | None
    job_type: str
    job_started: float | None
    job_deadline: float | None
    heartbeat: float
    jobs_done: int
    term: int
    rss_bytes: int
    message: str


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "replace")


def _opt(value: float) -> float | None:
    return None if math.isnan(value) else value


class Board:
    def __init__(self, slots: int = MAX_SLOTS) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, _HEADER.size + _SLOT.size * slots)
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
        return _HEADER.size + _SLOT.size * slot

    def reset(self, slot: int, role: str = "", index: int = 0) -> None:
        """Master, before fork (or after reaping, with no role): a clean
        slot. The child writes its own pid once it runs."""
        _SLOT.pack_into(self._mem, self._offset(slot), 0, 0, role.encode(), index,
                        ChildState.STARTING, NO_JOB, math.nan, math.nan, time.monotonic(),
                        0, 0, 0, b"", b"")

    def used_slots(self) -> list[SlotView]:
        """Every slot a child occupies (for the node's process registry)."""
        views = (self.read(slot) for slot in range(self.slots))
        return [view for view in views if view.role and view.pid]

    def read(self, slot: int) -> SlotView:
        offset = self._offset(slot)
        for _ in range(READ_RETRIES):
            values = _SLOT.unpack_from(self._mem, offset)
            if values[0] % 2 == 0 and _SLOT.unpack_from(self._mem, offset)[0] == values[0]:
                break
        else:  # a writer kept the slot busy: the last consistent view will do
            if slot in self._last:
                return self._last[slot]
        (_seq, pid, role, index, state, job_id, started, deadline, heartbeat, done, term, rss,
         job_type, message) = values
        self._last[slot] = view = SlotView(pid, _text(role), index, ChildState(state),
                        None if job_id == NO_JOB else job_id,
                        _text(job_type), _opt(started), _opt(deadline), heartbeat, done,
                        term, rss, _text(message))
        return view

    def writer(self, slot: int) -> "SlotWriter":
        return SlotWriter(self._mem, self._offset(slot))

    def close(self) -> None:
        self._mem.close()


class SlotWriter:
    """A child's handle on its own slot. Every update is one seqlock write."""

    def __init__(self, mem: mmap.mmap, offset: int) -> None:
        self._mem = mem
        self._offset = offset
        self._values = list(_SLOT.unpack_from(mem, offset))
        self._lock = threading.Lock()  # the main thread and the monitor thread both write

    def update(self, **fields: object) -> None:
        with self._lock:
            self._update(fields)

    def _update(self, fields: dict[str, object]) -> None:
        values = self._values
        for name, value in fields.items():
            index = _FIELDS[name]
            if name in ("job_type", "message"):
                value = str(value).encode()[: (64 if name == "job_type" else TEXT_BYTES)]
            elif name == "job_id" and value is None:
                value = NO_JOB
            elif name in ("job_started", "job_deadline") and value is None:
                value = math.nan
            values[index] = value
        values[0] += 1  # odd: a write is in progress, readers retry
        packed = _SLOT.pack(*values)
        start, end = self._offset, self._offset + _SLOT.size
        # Slice assignment is a plain copy: struct.pack_into would first
        # zero the whole slot, and a reader could see that as a valid slot.
        self._mem[start:start + 8] = packed[:8]
        self._mem[start + 8:end] = packed[8:]
        values[0] += 1
        self._mem[start:start + 8] = struct.pack("<q", values[0])

    def job(self, state: int, job_id: int | None, started: float | None,
            deadline: float | None, jobs_done: int, job_type: str | None = None) -> None:
        """The per-job update (a worker does one or two per job): only the
        job fields are rewritten, and the type only when it changed."""
        fields = [state, NO_JOB if job_id is None else job_id,
                  math.nan if started is None else started,
                  math.nan if deadline is None else deadline]
        encoded = None if job_type is None else job_type.encode()[:_JOB_TYPE.size]
        with self._lock:
            values = self._values
            packed = _JOB_FIELDS.pack(*fields, values[8], jobs_done)  # before the odd write:
            new_type = encoded is not None and encoded != values[12]  # nothing may fail after it
            start = self._offset
            values[0] += 1
            self._mem[start:start + 8] = _SEQ.pack(values[0])
            values[4:10] = [*fields, values[8], jobs_done]
            at = start + _JOB_FIELDS_AT
            self._mem[at:at + _JOB_FIELDS.size] = packed
            if new_type:
                values[12] = encoded
                at = start + _JOB_TYPE_AT
                self._mem[at:at + _JOB_TYPE.size] = _JOB_TYPE.pack(encoded)
            values[0] += 1
            self._mem[start:start + 8] = _SEQ.pack(values[0])

    def heartbeat(self) -> None:
        self.update(heartbeat=time.monotonic())


_FIELDS = {name: i for i, name in enumerate(
    ["seq", "pid", "role", "index", "state", "job_id", "job_started", "job_deadline", "heartbeat",
     "jobs_done", "term", "rss_bytes", "job_type", "message"])}
