"""Where W2's pickup time goes, phase by phase, in the real run: the
system calls of one W2 run per config, recorded by `perf` for the whole
machine, give each job's path from its enqueue to its handler starting,
through the enqueuer's and the worker's PostgreSQL backends.

    python bench/pickup_trace.py [--configs pulse-autocommit,probe] [--seconds 5]

For each config it runs `bench/harness.py w2 --workers 1 --repeat 1`,
finds the worker process (Pulse's by its title, the probe's as a forked
child of its `_worker` process), waits --delay seconds (start-up, warm-up
and idle time), and records sendto/recvfrom/write/fdatasync entries of
every process for --seconds. Per job, walking back from the NOTIFY the
worker reads to the enqueue that sent it:

- enqueue sent -> its backend reads it -> that backend's WAL flush
  starts (the insert has run and commits) -> the worker's backend sends
  the NOTIFY -> the worker reads it;

then forward, the claim sent, its reply read, and the handler's first
write to its latency file:

- notify -> claim sent: the worker's Python from the wake-up to the claim;
- claim sent -> backend reads it, -> backend's WAL flush starts
  (fdatasync: the statement has run and commits), -> backend replies;
- reply -> worker reads it: scheduling and the socket;
- reply read -> handler: the worker's Python from the claim's rows to the
  handler's first line.

Medians (and p25/p75) in microseconds, as text. Only system-call entries
are recorded (a few per job), so the run is barely slowed, unlike strace.
Needs `perf` (linux-perf) and root.
The latency figures the harness prints for these runs are W2's own.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# x86_64 system call numbers
WRITE, FSYNC, FDATASYNC, SENDTO, RECVFROM = 1, 74, 75, 44, 45
# The phases of one job, in order: the enqueue's (found for most jobs:
# the commit's flush may be another process's), then the worker's.
ENQUEUE_PHASES = ["enqueue sent -> its backend reads it",
                  "that backend reads -> its WAL flush starts",
                  "insert's flush starts -> NOTIFY sent to worker",
                  "NOTIFY sent -> worker reads it"]
PHASES = ENQUEUE_PHASES + [
    "notify -> claim sent", "claim sent -> backend reads it",
    "backend reads -> WAL flush starts", "backend reads -> replies",
    "backend replies -> worker reads", "reply read -> handler"]
WINDOW_S = 0.015  # how far before a NOTIFY its enqueue is looked for (W2: one job each 20 ms)


def find_worker(config: str, deadline: float) -> int:
    """The pid of the config's (only) worker process, once it exists."""
    while time.monotonic() < deadline:
        procs = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            procs[int(entry)] = (cmd, ppid)
        for pid, (cmd, ppid) in procs.items():
            parent = procs.get(ppid, ("", 0))[0]
            if config == "probe" and "_worker" in cmd and "_worker" in parent:
                return pid
            if config != "probe" and cmd.startswith("pulsed: worker"):
                return pid
        time.sleep(0.05)
    raise RuntimeError(f"no worker process of {config} appeared")


def record(config: str, a: argparse.Namespace, out: Path) -> tuple[int, str]:
    """Run W2 for one config, perf-recording while it measures; the
    worker's pid and the harness's latency line."""
    harness = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "harness.py"), "w2", "--peers", config,
         "--workers", "1", "--repeat", "1", "--results", str(out.parent / f"{config}-results")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = find_worker(config, time.monotonic() + 120)
        time.sleep(a.delay)
        # Every process's socket and flush calls; writes only the worker's
        # (perf's own writes to its file would otherwise flood the record).
        syscalls = " || ".join(f"id == {n}" for n in (FSYNC, FDATASYNC, SENDTO, RECVFROM))
        syscalls += f" || (id == {WRITE} && common_pid == {pid})"
        subprocess.run(["perf", "record", "-q", "-a", "-e", "raw_syscalls:sys_enter",
                        "--filter", syscalls, "-o", str(out), "--", "sleep", str(a.seconds)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        output, _ = harness.communicate(timeout=300)
    finally:
        if harness.poll() is None:
            harness.kill()
    line = next((row for row in output.splitlines() if row.startswith(f"| {config} |")), "")
    return pid, line


def events(path: Path) -> list[tuple[str, int, float, int, int]]:
    """(command, thread id, time, syscall number, first argument) per entry."""
    text = subprocess.run(["perf", "script", "-i", str(path), "-F", "comm,tid,time,trace"],
                          capture_output=True, text=True, check=True).stdout
    found = []
    for row in text.splitlines():
        m = re.match(r"\s*(.+?)\s+(\d+)\s+(\d+\.\d+):\s+NR (\d+) \(([0-9a-f]+)", row)
        if m:
            found.append((m[1], int(m[2]), float(m[3]), int(m[4]), int(m[5], 16)))
    return found


def phases(found: list[tuple[str, int, float, int, int]], pid: int) -> list[dict[str, float]]:
    """Each picked-up job's phases (PHASES' names), in seconds."""
    worker = [(i, e) for i, e in enumerate(found) if e[1] == pid]
    jobs = []
    for k in range(len(worker) - 3):
        (i_notify, notify), (i_send, send), (_, reply), (_, handler) = worker[k:k + 4]
        if not (notify[3] == RECVFROM and send[3] == SENDTO and reply[3] == RECVFROM
                and handler[3] == WRITE and handler[4] not in (1, 2, send[4])):
            continue
        if k > 0 and worker[k - 1][1][3] == SENDTO:
            continue  # that recvfrom was a reply, not a NOTIFY
        after = [e for e in found[i_send + 1:] if e[2] < reply[2]]
        read = next((e for e in after if e[0] == "postgres" and e[3] == RECVFROM), None)
        if read is None:
            continue
        backend = [e for e in after if e[1] == read[1] and e[2] > read[2]]
        flush = next((e for e in backend if e[3] in (FSYNC, FDATASYNC)), None)
        replied = next((e for e in backend if e[3] == SENDTO), None)
        if flush is None or replied is None:
            continue
        job = dict(zip(PHASES[len(ENQUEUE_PHASES):], [
            send[2] - notify[2], read[2] - send[2], flush[2] - read[2],
            replied[2] - read[2], reply[2] - replied[2], handler[2] - reply[2]]))
        job["notify -> handler"] = handler[2] - notify[2]
        job.update(_enqueue_phases(found, i_notify, notify, worker_backend=read[1], pid=pid))
        jobs.append(job)
    return jobs


def _enqueue_phases(found: list[tuple[str, int, float, int, int]], i_notify: int,
                    notify: tuple[str, int, float, int, int], worker_backend: int, pid: int
                    ) -> dict[str, float]:
    """The enqueue behind one NOTIFY, walking back from it: the worker's
    backend sending the NOTIFY, the last WAL flush before that by another
    backend (the insert's commit), that backend's read of the insert, and
    the client's send just before. Empty when a step is not found (the
    WAL writer flushed, or the enqueue came before the window)."""
    before = []
    for e in reversed(found[:i_notify]):
        if e[2] < notify[2] - WINDOW_S:
            break
        before.append(e)  # newest first
    sent = next((e for e in before if e[1] == worker_backend and e[3] == SENDTO), None)
    if sent is None:
        return {}
    earlier = [e for e in before if e[2] < sent[2]]
    flush = next((e for e in earlier if e[0] == "postgres" and e[1] != worker_backend
                  and e[3] in (FSYNC, FDATASYNC)), None)
    if flush is None:
        return {}
    read = next((e for e in earlier if e[1] == flush[1] and e[3] == RECVFROM
                 and e[2] < flush[2]), None)
    if read is None:
        return {}
    client = next((e for e in earlier if e[0] != "postgres" and e[1] != pid
                   and e[3] == SENDTO and e[2] < read[2]), None)
    if client is None:
        return {}
    return dict(zip(ENQUEUE_PHASES, [read[2] - client[2], flush[2] - read[2],
                                     sent[2] - flush[2], notify[2] - sent[2]]))


def summary(config: str, jobs: list[dict[str, float]], latency: str) -> str:
    rows = [f"{config}: {len(jobs)} jobs traced; W2 line: {latency or 'n/a'}"]
    if len(jobs) < 4:
        return rows[0] + "\n  (too few jobs traced: is perf allowed to record every process?)"
    for name in PHASES + ["notify -> handler"]:
        values = [job[name] * 1e6 for job in jobs if name in job]
        if len(values) < 4:
            rows.append(f"  {name:46} (found for {len(values)} jobs)")
            continue
        q = statistics.quantiles(values, n=4)
        rows.append(f"  {name:46} p50 {q[1]:6.0f} us   p25 {q[0]:6.0f}   p75 {q[2]:6.0f}"
                    f"   ({len(values)} jobs)")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="pulse-autocommit,probe",
                   help="harness configs, one W2 run each (default: pulse-autocommit,probe)")
    p.add_argument("--delay", type=float, default=8.0,
                   help="seconds from the worker's start to recording (default 8)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds recorded (default 5)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pickup-trace-") as tmp:
        for config in a.configs.split(","):
            out = Path(tmp) / f"{config}.perf"
            pid, latency = record(config, a, out)
            print(summary(config, phases(events(out), pid), latency), flush=True)


if __name__ == "__main__":
    main()
