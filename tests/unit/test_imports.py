"""Every module of pulsed imports on its own, as the first pulsed module a
program imports: a circular import only shows when its cycle is entered
from the wrong end (importing pulsed.worker_process first failed: worker_process,
master.releases, the master package, master.loop, roles, worker_process)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pulsed

# Each module in a fresh set of pulsed modules (third-party ones stay
# loaded: their import order is not ours). A module that needs an extra that
# is not installed (Django, SQLAlchemy, OpenTelemetry) is reported apart.
CHECK = r"""
import importlib, sys
failed, extras = [], []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "pulsed" or m.startswith("pulsed.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if exc.name and not exc.name.startswith("pulsed"):
            extras.append(name)
        else:
            failed.append(f"{name}: {exc}")
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\n".join(failed))
"""


# Modules that refuse to load outside their setting, by design.
NOT_ALONE = {"pulsed.__main__": "importing it runs pulsed",
             "pulsed.contrib.django.worker": "needs DJANGO_SETTINGS_MODULE"}


def test_every_module_imports_first():
    names = sorted(info.name for info in pkgutil.walk_packages(pulsed.__path__, "pulsed.")
                   if info.name not in NOT_ALONE)
    assert len(names) > 50 and "pulsed.worker_process" in names
    halves = [names[0::2], names[1::2]]  # two interpreters at once: ~0.15 s a module
    checks = [subprocess.Popen([sys.executable, "-c", CHECK, *half], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for half in halves]
    for check in checks:
        out, err = check.communicate(timeout=120)
        assert check.returncode == 0, err[-2000:]
        assert out.strip() == "", out
