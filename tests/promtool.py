"""`promtool check metrics` on an exposition (Debian's prometheus package)."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def promtool_check(text: str) -> None:
    """Fail unless promtool accepts the exposition; skip without promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
