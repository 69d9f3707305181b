"""How a start tells a live pulsed from a dead one (pulsed/node.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from pulsed.node import _runs_pulsed, host_identity, pulsed_alive


def test_a_master_not_titled_yet_is_known_by_its_command() -> None:
    assert _runs_pulsed(["/usr/bin/python3", "/usr/local/bin/pulsed", "--config", "x"])
    assert _runs_pulsed(["/usr/bin/python3", "-m", "pulsed", "--config", "x"])
    assert _runs_pulsed(["pulsed"])
    assert not _runs_pulsed(["/usr/bin/python3", "-m", "pytest", "pulsed"])
    assert not _runs_pulsed(["bash", "-c", "sleep 1"])


def test_a_reused_pid_or_this_process_is_not_a_live_pulsed() -> None:
    assert not pulsed_alive(os.getpid())  # a start never mistakes itself for the holder
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not pulsed_alive(other.pid)
        assert not pulsed_alive(other.pid, "pulsed: worker")
    finally:
        other.kill()
        other.wait()
    assert not pulsed_alive(other.pid)  # gone


def test_a_process_titled_as_a_worker_is_one() -> None:
    code = ("import setproctitle, time; setproctitle.setproctitle('pulsed: worker 1 [idle]'); "
            "print(flush=True); time.sleep(30)")
    titled = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert titled.stdout is not None and titled.stdout.readline() == b"\n"
        assert pulsed_alive(titled.pid, "pulsed: worker")
        assert pulsed_alive(titled.pid)
    finally:
        titled.kill()
        titled.wait()


def test_the_host_identity_names_this_boot_and_pid_namespace() -> None:
    assert host_identity() == host_identity()
    assert "/pidns:" in host_identity()
