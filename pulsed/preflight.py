"""`pulsed --check-config` imports the handler modules the way a worker will.

In a fresh interpreter with this process's sys.path (a worker is a fork of
the master, which `pulsed` started just like `pulsed --check-config`), the
config's import path in front (`config.import_path`) and the same function
a worker calls (`children.import_handlers`). A subprocess, because a
module's import-time code (connections, threads, registrations) must not
run in the checking process, and an import that hangs must not hang it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from pulsed.config import Config, import_path
from pulsed.errors import ConfigError

IMPORT_TIMEOUT_S = 60.0
KEY = "worker.handlers"

# sys.path first: the checked interpreter must find pulsed where we did.
_PROGRAM = ("import json, sys; spec = json.loads(sys.argv[1]); sys.path[:] = spec['sys_path']; "
            "from pulsed.preflight import import_each; "
            "sys.exit(import_each(spec['modules'], spec['path']))")


def check_handlers(config: Config, *, timeout: float = IMPORT_TIMEOUT_S) -> None:
    """Raise ConfigError (worker.handlers) naming the first handler module
    that cannot be imported, and why."""
    modules = list(config.worker.handlers)
    if not modules:
        return
    path = list(import_path(config))
    spec = json.dumps({"sys_path": sys.path, "path": path, "modules": modules})
    try:
        done = subprocess.run([sys.executable, "-c", _PROGRAM, spec], capture_output=True,
                              text=True, errors="replace", stdin=subprocess.DEVNULL,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(KEY, f"importing {modules} took longer than {timeout:g}s") from None
    if done.returncode != 0:
        raise ConfigError(KEY, _one_line(_problem(done, modules, path)))


def import_each(modules: Sequence[str], path: Sequence[str]) -> int:
    """In the checked interpreter: import each module; on the first failure
    print what failed as the last line of stdout (after whatever the module
    printed) and return 1."""
    from pulsed.children import import_handlers
    for name in modules:
        try:
            import_handlers([name], path)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: a worker would die of it
            print("\n" + json.dumps({"module": name, "error": f"{type(exc).__name__}: {exc}",
                                     "missing": getattr(exc, "name", None),
                                     "at": _where(exc)}), flush=True)
            return 1
    return 0


def _where(exc: BaseException) -> str | None:
    """file:line of the innermost frame in the handler's code, not importlib's or ours."""
    if isinstance(exc, SyntaxError):
        return f"{exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(("<", _IMPORTLIB_DIR)) and f.filename != _CHILDREN_FILE]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


def _problem(done: subprocess.CompletedProcess[str], modules: list[str], path: list[str]) -> str:
    found = _last_json(done.stdout)
    if found is None:  # it died without telling: os._exit, a signal, a crash in C
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"importing {modules} ended with exit status {done.returncode}: {last}"
    name, problem = found["module"], f"cannot import {found['module']!r}: {found['error']}"
    missing = found.get("missing")
    if missing and (name == missing or name.startswith(f"{missing}.")):
        where = f"in {', '.join(path)} nor " if path else ""
        problem += f" (not found {where}on the Python path)"
    elif found.get("at"):
        problem += f" (at {found['at']})"
    return problem


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        return found if isinstance(found, dict) and "module" in found else None
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


_CHILDREN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "children.py")
_IMPORTLIB_DIR = os.path.dirname(importlib.__file__)
