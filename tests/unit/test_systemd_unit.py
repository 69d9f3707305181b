"""The shipped unit file: the settings SPEC §4 asks for, and systemd accepts it."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "pulsed.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read(UNIT)
    return parser["Service"]


def test_unit_declares_notify_reload_and_mixed_kill() -> None:
    service = _service()
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert "-HUP" in service["ExecReload"]
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > 30  # above the default stop_timeout
    assert service["RuntimeDirectory"] and service["StateDirectory"]
    assert service["User"] == "pulse"
    assert service["NoNewPrivileges"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    pulsed = Path(sys.executable).with_name("pulsed")
    text = UNIT.read_text().replace("/usr/local/bin/pulsed", str(pulsed))
    unit = tmp_path / "pulsed.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
