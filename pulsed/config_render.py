"""The commented default config (`pulsectl config init`): every key at
its default, loading back as default_config()."""

from __future__ import annotations

from typing import Any

import tomli_w

from pulsed.config_model import Config
from pulsed.config_schema import _SECTIONS, _Field
from pulsed.config_values import _DURATION_UNITS


# --- the commented default config (`pulsectl config init`) -------------------

_RENDER_HEADER = """\
# Pulse configuration. Every key is optional; the values shown are the defaults.
# Durations are seconds or strings like "30s", "5m", "1h", "1d", "250ms".
# PULSE_<SECTION>_<KEY> environment variables override this file,
# e.g. PULSE_DATABASE_URL, PULSE_DAEMON_WORKERS=4, PULSE_WORKER_HANDLERS=a.jobs,b.jobs"""

_RENDER_EXAMPLES = """
# Per job type settings, all optional:
# [types.email]
# max_attempts = 5        # attempts before the job fails
# timeout = "30s"         # a running attempt is stopped after this
# priority = 0            # default priority, lower runs first (-32768..32767)
# concurrency = 10        # at most this many running, cluster-wide
# rate = "100/m"          # at most this many starts per s, m or h

# Periodic jobs, enqueued once per due time by the leader:
# [[cron]]
# name = "nightly-report" # unique
# type = "report"
# schedule = "0 3 * * *"  # minute hour day-of-month month day-of-week; or every = "10m"
# payload = {}
# queue = "default"
# priority = 0
# catch_up = false        # true: enqueue runs missed while no leader was up
# timezone = "UTC"        # the schedule's local time (an IANA name: "Europe/Berlin")
# Daylight saving as cron: a time skipped in spring runs at the next minute, one
# repeated in autumn runs once (a "*" minute or hour keeps its pace through both)."""


def render_default_config() -> str:
    """Commented TOML with every key at its default; it loads back as default_config()."""
    defaults = Config()  # default_config()
    lines = [_RENDER_HEADER]
    for name, (_, spec) in _SECTIONS.items():
        lines += ["", f"[{name}]"]
        section = getattr(defaults, name)
        lines += [_render_key(key, field_, getattr(section, key)) for key, field_ in spec.items()]
    return "\n".join(lines) + "\n" + _RENDER_EXAMPLES + "\n"


def _render_key(key: str, field_: _Field, default: Any) -> str:
    if field_.example is not None:  # None or host-specific: show, but leave unset
        pair = "# " + tomli_w.dumps({key: field_.example}).strip()
    else:
        value = _format_duration(default) if field_.kind == "duration" else default
        pair = tomli_w.dumps({key: list(value) if isinstance(value, tuple) else value}).strip()
    return f"{pair:<40} # {field_.doc}"


def _format_duration(seconds: float) -> str | float:
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count == round(count):
            return f"{round(count)}{unit}"
    return seconds
