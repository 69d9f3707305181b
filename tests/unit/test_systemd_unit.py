"""The shipped unit file: the settings SPEC §4 asks for, names that cannot
collide with PulseAudio's, hardening, and systemd accepts it (issue 24,
item 8)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pulsed.config as cfg
import pulsed.config_model as config_model
from pulsed.config import default_socket, default_state_dir, load_config, parse_config

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "pulsed.service"
INSTALLED_PULSED = "/opt/pulsed/bin/pulsed"
# `systemd-analyze security` scores exposure from 0 (locked down) to 10;
# 1.2 when this was written. A new setting that loosens it shows here.
MAX_EXPOSURE = 2.0
HARDENING = {
    "SystemCallFilter": "@system-service", "ProtectProc": "invisible", "ProcSubset": "pid",
    "RemoveIPC": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
    "RestrictNamespaces": "yes", "CapabilityBoundingSet": "", "LockPersonality": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "SystemCallArchitectures": "native",
}
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed on this machine (Debian: apt-get install systemd)")


def _sections() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read(UNIT)
    return parser


def _service() -> configparser.SectionProxy:
    return _sections()["Service"]


def _all_values(key: str) -> list[str]:
    """Every value of a key the unit repeats (configparser keeps the last)."""
    return re.findall(rf"^{key}=(.*)$", UNIT.read_text(), re.M)


def test_unit_declares_notify_reload_and_mixed_kill() -> None:
    service = _service()
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert "-HUP" in service["ExecReload"]
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > 30  # above the default stop_timeout


def test_unit_names_cannot_collide_with_pulseaudio() -> None:
    service = _service()
    assert (service["User"], service["Group"]) == ("pulsed", "pulsed")
    assert (service["StateDirectory"], service["RuntimeDirectory"]) == ("pulsed", "pulsed")
    for key in ("ExecStart", "ExecStartPre"):
        assert service[key].startswith(f"{INSTALLED_PULSED} --config /etc/pulsed/pulse.toml")
    settings = "\n".join(line for line in UNIT.read_text().splitlines()
                         if not line.startswith("#"))
    assert not re.search(r"/etc/pulse/|/run/pulse\b|/var/lib/pulse\b|=pulse$", settings, re.M)


def test_unit_is_hardened() -> None:
    service = _service()
    for key, value in HARDENING.items():
        assert value in _all_values(key), f"{key}={value} missing from {UNIT}"
    assert "Documentation" not in _sections()["Unit"]  # no placeholder URL


def test_pulsed_keeps_state_and_socket_in_systemds_directories(monkeypatch) -> None:
    env = {"STATE_DIRECTORY": "/var/lib/pulsed", "RUNTIME_DIRECTORY": "/run/pulsed:/run/x"}
    monkeypatch.setattr(cfg.os, "geteuid", lambda: 1000)  # User=pulsed, not root
    config = parse_config({}, env=env)
    assert config.daemon.state_dir == Path("/var/lib/pulsed")
    assert config.daemon.socket_path == Path("/run/pulsed/pulsed.sock")
    assert default_state_dir({"STATE_DIRECTORY": "relative", "HOME": "/h"}) == Path(
        "/h/.local/state/pulse")
    assert default_socket({}) is None


def test_root_finds_the_services_socket_while_it_runs(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cfg.os, "geteuid", lambda: 0)  # sudo pulsectl status
    monkeypatch.setattr(config_model, "ROOT_RUNTIME_DIR", tmp_path / "run-pulsed")
    assert parse_config({}, env={}).daemon.socket_path == Path("/var/lib/pulsed/pulsed.sock")
    (tmp_path / "run-pulsed").mkdir()
    assert parse_config({}, env={}).daemon.socket_path == tmp_path / "run-pulsed" / "pulsed.sock"


def test_config_search_prefers_etc_pulsed_and_keeps_etc_pulse(monkeypatch, tmp_path) -> None:
    assert cfg.DEFAULT_CONFIG_PATHS[1:] == (Path("/etc/pulsed/pulse.toml"),
                                            Path("/etc/pulse/pulse.toml"))
    new, old = tmp_path / "pulsed.toml", tmp_path / "pulse.toml"
    old.write_text("[daemon]\nworkers = 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATHS", (Path("absent.toml"), new, old))
    assert load_config(env={}).daemon.workers == 7  # only the old one: still read
    new.write_text("[daemon]\nworkers = 3\n")
    assert load_config(env={}).daemon.workers == 3


def _installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's pulsed (verify checks
    that the binary exists)."""
    pulsed = Path(sys.executable).with_name("pulsed")
    unit = tmp_path / "pulsed.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_PULSED, str(pulsed)))
    return unit


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(_installed_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr and "Ignoring" not in result.stderr, result.stderr


@needs_systemd_analyze
def test_systemd_analyze_security_scores_the_unit_ok(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                             str(_installed_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    found = re.search(r"Overall exposure level for pulsed\.service: ([\d.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
