"""Fuzzed config files: `pulsed --check-config` exits 0 or 78, and a bad
file gets one line that names the key (or the file and the TOML error),
never a traceback. Hypothesis generates random text, TOML-ish text built
from real fragments, and valid TOML with values of the wrong type under
every known key. A handful also run through the real entry point, and a
running daemon refuses a garbage reload and carries on."""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
import tempfile
from datetime import date, datetime, time as dtime
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, example, given, settings, strategies as st

from pulsed.cli import main
from pulsed.config import _CRON_CHECKS, _SECTIONS, _TYPE_CHECKS
from tests.pg import wait_until
from tests.system.daemon import REPO, pid_alive

EXIT_OK, EXIT_CONFIG = 0, 78
PREFIX = "pulsed: invalid config: "
FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
# Keys whose error may be reported under another key: the cross-field checks.
CONSISTENCY_KEYS = ("scheduler.interval", "api.token")

KNOWN = ([(section, key) for section, (_, spec) in _SECTIONS.items() for key in spec]
         + [("types.email", key) for key in _TYPE_CHECKS]
         + [("cron", key) for key in _CRON_CHECKS])


def check(text: str | bytes) -> tuple[int, str]:
    """Run `pulsed --config FILE --check-config` in-process: (exit code, stderr)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "pulse.toml")
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(["--config", str(path), "--check-config"])
            except SystemExit as exc:  # argparse; not expected here
                code = exc.code
        return code, err.getvalue()


def assert_clean(code: int, stderr: str) -> None:
    assert code in (EXIT_OK, EXIT_CONFIG), (code, stderr[-3000:])
    if code == EXIT_CONFIG:
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(PREFIX), stderr[-3000:]
        assert "config key '" in lines[0], lines[0][:500]
    else:
        assert stderr == "", stderr[-3000:]


FRAGMENTS = ["[daemon]\n", "[worker]\n", "[scheduler]\n", "[api]\n", "[database]\n",
             "[types.email]\n", "[[cron]]\n", "[types]\n", "[[daemon]]\n", "workers = ",
             "lease_ttl = ", "handlers = ", "url = ", "listen = ", "rate = ", "schedule = ",
             "name = ", "every = ", "payload = ", "= ", "1", "-1", "0", "3.5", "nan", "inf",
             "true", '"30s"', '"100/m"', '"* * * * *"', '"x"', "'", '"', "[", "]", "{", "}",
             ",", ".", "\n", " ", "#", "1979-05-27T07:32:00Z", '"""', "\\u0000", "\x00",
             "é", "\ufeff", "0x10", "1_000", "+inf", "a.b.c = 1\n"]

toml_ish = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)

wrong_values = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(allow_nan=True),
    st.booleans(), st.text(max_size=30), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.just(datetime(2024, 1, 1, 12, 0)), st.just(date(2024, 1, 1)), st.just(dtime(12, 0)))


@FUZZ
@given(st.text(max_size=300))
@example("\ufeff[daemon]\nworkers = 2\n")
@example("[daemon]\nworkers = 1e400\n")
def test_random_text(text):
    assert_clean(*check(text))


@pytest.mark.parametrize("text", [
    "a = " + "[" * 3000 + "]" * 3000,
    "a = " + "{b = " * 600 + "1" + "}" * 600,
    "[daemon]\nnode_id = " + "[" * 3000,
], ids=["arrays 3,000 deep", "inline tables 600 deep", "unclosed 3,000 deep"])
def test_deeply_nested_toml(text):
    """tomllib parses arrays and inline tables recursively: deep nesting
    raises RecursionError, which must become a config error too."""
    assert_clean(*check(text))


@FUZZ
@given(st.binary(max_size=200))
@example(b"\xff\xfe[daemon]\n")
@example(b"[daemon]\nworkers = 2\x00\n")
def test_random_bytes(data):
    assert_clean(*check(data))


@FUZZ
@given(toml_ish)
def test_toml_ish_text(text):
    assert_clean(*check(text))


@FUZZ
@given(st.sampled_from(KNOWN), wrong_values)
def test_valid_toml_with_wrong_types(where, value):
    section, key = where
    if section == "cron":
        data = {"cron": [{"name": "n", "type": "t", "every": "1m", key: value}]}
        if key in ("schedule",):
            data["cron"][0].pop("every")
        label = f"cron[0].{key}"
    elif section.startswith("types."):
        data = {"types": {section.split(".", 1)[1]: {key: value}}}
        label = f"{section}.{key}"
    else:
        data = {section: {key: value}}
        label = f"{section}.{key}"
    try:
        text = tomli_w.dumps(data)
    except (TypeError, ValueError):
        return  # not representable in TOML (e.g. a NUL in a key)
    code, stderr = check(text)
    assert_clean(code, stderr)
    if code == EXIT_CONFIG:
        named = stderr.split("config key '", 1)[1].split("'", 1)[0]
        assert named in (label, *CONSISTENCY_KEYS) or named.startswith(label), (label, stderr)


@pytest.mark.parametrize("text", [
    "[daemon]\nworkers = 'four'\n",
    "[daemon\nworkers = 4\n",
    "a = " + "[" * 3000 + "]" * 3000,
])
def test_real_entry_point(tmp_path, text):
    path = tmp_path / "pulse.toml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "pulsed", "--config", str(path),
                           "--check-config"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == EXIT_CONFIG, (done.returncode, done.stderr[-3000:])
    assert len(done.stderr.splitlines()) == 1 and "config key '" in done.stderr, done.stderr


@pytest.mark.timeout(60)
def test_reload_with_a_garbage_config_is_refused_and_the_daemon_carries_on(daemon_factory,
                                                                           conn, marks):
    import pulsed
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    good = daemon.config_path.read_text()
    # the last: a cron entry whose job enqueue refuses (a NaN in its payload),
    # which crashed the leader's scheduler at every tick once reloaded
    cron = good + '[[cron]]\nname = "n"\ntype = "noop"\nevery = 5\npayload = {a = nan}\n'
    for count, garbage in enumerate(("[daemon\n", "[daemon]\nworkers = 'lots'\n",
                                     "a = " + "[" * 3000, cron), start=1):
        daemon.config_path.write_text(garbage)
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: daemon.log_text().count("reload refused") == count, timeout=10,
                   message=f"reload refusal {count}")
        assert pid_alive(daemon.pid), daemon.log_tail()
        assert daemon.status()["master"]["state"] == "running"
    daemon.config_path.write_text(good)
    job_id = pulsed.enqueue(conn, "noop", {"dir": str(marks)})
    wait_until(lambda: list(marks.glob(f"{job_id}.*.done")), timeout=15,
               message=f"a job after the refused reloads; log:\n{daemon.log_tail()}")
