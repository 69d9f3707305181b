"""What each kind of child runs once forked, by role name."""

from __future__ import annotations

from typing import Callable

from pulsed.children import ChildRuntime
from pulsed.scheduler import scheduler_main
from pulsed.worker_process import worker_main


def api_main(runtime: ChildRuntime) -> int:
    """The HTTP API child. pulsed.http is imported here, after the fork:
    only this child serves HTTP, and the import (wsgiref, http.server,
    email) was ~14 ms of every start-up before the first worker forked."""
    from pulsed.http import api_main as serve
    return serve(runtime)


ROLE_MAINS: dict[str, Callable[[ChildRuntime], int]] = {
    "worker": worker_main, "scheduler": scheduler_main, "api": api_main}
