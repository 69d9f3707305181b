"""Processes under test: spawn, stop, and what /proc says about them."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent  # the bench/ directory
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Workers:
    """The commands of one peer, each in its own process group (a forking
    daemon is one command; its children share its group)."""

    def __init__(self, cmds: list[list[str]], env: dict[str, str], logdir: Path):
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        for n, cmd in enumerate(cmds):
            log = logdir / f"worker-{n}.log"
            with open(log, "wb") as fh:
                self.procs.append(subprocess.Popen(
                    cmd, env=env, cwd=str(BENCH_DIR), stdout=fh, stderr=subprocess.STDOUT,
                    start_new_session=True))
            self.logs.append(log)

    def any_alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self, grace: float = 20.0) -> list[int | None]:
        """SIGTERM to each group, SIGKILL to whatever is left after `grace`."""
        for p in self.procs:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            _killpg(p.pid, signal.SIGKILL)  # leftovers of the group, e.g. orphaned children
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        return [p.returncode for p in self.procs]

    def tails(self, n: int = 1500) -> list[str]:
        return [log.read_text(errors="replace")[-n:] for log in self.logs if log.exists()]


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of processes under test: bench/ importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return sum(parts) - idle, sum(parts)


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_s(pid: int) -> float:
    """user + system CPU seconds of one live process (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def children_titles(pid: int) -> dict[int, str]:
    """Live children of pid -> their command line (a process title)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return {}
    out = {}
    for kid in map(int, kids):
        try:
            out[kid] = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            pass
    return out
