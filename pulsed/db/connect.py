"""One way to open a Pulse connection, and one way to wait before the next try.

Every process of Pulse connects through `connect()` (or, for a pool,
`connect_kwargs()`), naming its role: the role becomes the connection's
`application_name` ("pulse worker 3", "pulse scheduler", ...), so
pg_stat_activity says which process holds each backend, and picks the
connect timeout and the session timeouts that suit it. Every role also pins
the output formats psycopg reads and the isolation level (PINNED_SESSION),
over whatever the database's or the role's defaults say. TCP keepalives are
on everywhere, so a connection to a host that vanished (a failover, a cut
network) fails within about a minute instead of hanging for the kernel's
two hours.

Behind PgBouncer in transaction mode (`pooler="transaction"`) a session is
not the client's own: startup `options` are not sent (PgBouncer refuses or
drops them, and a setting would stick to a server connection other clients
share), and psycopg prepares nothing on the server (a prepared statement
lives on one server connection; the next transaction may get another).

`Backoff` is the reconnect delay every retry loop uses: exponential,
capped, jittered, so a fleet of workers that lost the database together
does not come back in lock step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import psycopg

from pulsed.db.sessions import PINNED_SESSION
from pulsed.db.store import BACKGROUND_SESSION, SCHEDULER_SESSION, session_options

# Poolers this module knows how to connect through (database.pooler).
POOLER_MODES = ("transaction",)

# TCP keepalives (libpq): probe an idle connection after 30 s, every 10 s,
# give up after 3 unanswered probes. Ignored on Unix sockets.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3}

# A transaction left open this long by a Pulse process is a stalled process
# (SIGSTOP, a paused VM): the server ends it so its row locks go. Pulse's own
# transactions are a few statements sent back to back.
IDLE_IN_TRANSACTION = "60s"


@dataclass(frozen=True)
class Role:
    """How one kind of Pulse process connects."""

    name: str  # application_name, before the instance (a worker's index)
    connect_timeout: int  # seconds
    settings: str  # session settings (startup options); "" for none

    def application_name(self, instance: object = None) -> str:
        return self.name if instance is None else f"{self.name} {instance}"


_IDLE = f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION}"

# Each role's timeouts, and why.
ROLES: dict[str, Role] = {
    # Claims and completions: no statement timeout (a claim behind a big
    # backlog is slow, not stuck); the claim's plan settings come from the
    # caller (CLAIM_SESSION).
    "worker": Role("pulse worker", 10, _IDLE),
    # SCHEDULER_SESSION: a frozen leader must not hold the lease row
    # (pulsed/db/store.py says why each bound is what it is).
    "scheduler": Role("pulse scheduler", 5, SCHEDULER_SESSION),
    # Reads for the HTTP API and /metrics: one backend, no JIT, and no read
    # that holds a request thread for long (pulsed/http/server.py).
    "api": Role("pulse api", 5, f"-c statement_timeout=10s {BACKGROUND_SESSION} {_IDLE}"),
    # The master's short lease releases: bounded, so a locked row never
    # freezes the loop that reaps children.
    "master": Role("pulse master", 3,
                   f"-c statement_timeout=10s -c lock_timeout=5s {_IDLE}"),
    # The node registry at start and stop.
    "node": Role("pulse node", 3, "-c statement_timeout=10s -c lock_timeout=5s"),
    # VACUUM sets its own lock timeout; it may run long.
    "vacuum": Role("pulse vacuum", 10, ""),
    # pulsed at start: migrations may take their time.
    "start": Role("pulsed start", 10, ""),
    # The operator's tools.
    "pulsectl": Role("pulsectl", 10, _IDLE),
    "top": Role("pulsectl top", 3, f"-c statement_timeout=5s {BACKGROUND_SESSION}"),
    # pulsed.connect() in an application's script: the script's own session.
    "script": Role("pulse script", 10, ""),
}


class UnknownRole(ValueError):
    """connect() was given a role that ROLES does not name."""


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise UnknownRole(f"unknown connection role {name!r}; one of: "
                          f"{', '.join(sorted(ROLES))}") from None


def connect_kwargs(dsn: str, role_name: str, *, instance: object = None,
                   settings: str = "", pooler: str | None = None,
                   autocommit: bool = True, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of psycopg.connect() (or a ConnectionPool's
    `kwargs`) for a connection of this role. `settings` adds session
    settings to the role's; `overrides` win over everything."""
    spec = role(role_name)
    if pooler is not None and pooler not in POOLER_MODES:
        raise ValueError(f"pooler must be one of {', '.join(POOLER_MODES)} or None, "
                         f"got {pooler!r}")
    kwargs: dict[str, Any] = {"autocommit": autocommit, "connect_timeout": spec.connect_timeout,
                              "application_name": spec.application_name(instance),
                              **KEEPALIVES}
    # PINNED_SESSION for every role, first: a role's or the caller's
    # settings may still say otherwise.
    wanted = f"{PINNED_SESSION} {spec.settings} {settings}".strip()
    if pooler == "transaction":
        kwargs["prepare_threshold"] = None  # no prepared statement outlives a transaction
    elif wanted:
        kwargs["options"] = session_options(dsn, wanted)
    kwargs.update(overrides)
    return kwargs


def connect(dsn: str, role_name: str, *, instance: object = None, settings: str = "",
            pooler: str | None = None, autocommit: bool = True,
            **overrides: Any) -> psycopg.Connection[Any]:
    """Open a connection for one Pulse role (see ROLES): autocommit unless
    told otherwise, named, timed out, with keepalives."""
    kwargs = connect_kwargs(dsn, role_name, instance=instance, settings=settings,
                            pooler=pooler, autocommit=autocommit, **overrides)
    return psycopg.connect(dsn, **kwargs)


class Backoff:
    """Delays between reconnect attempts: base * 2**(n-1) for the n-th
    failure in a row, capped at `cap`, times a random factor in
    [1 - jitter, 1]. reset() after a success."""

    def __init__(self, base: float = 0.2, cap: float = 5.0, jitter: float = 0.5, *,
                 rng: Callable[[float, float], float] = random.uniform) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base!r} cap={cap!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {jitter!r}")
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        """Count one more failure; how long to wait before the next try."""
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures - 1, 62))
        return delay * self._rng(1 - self.jitter, 1.0)

    def reset(self) -> None:
        self.failures = 0

    def wait(self, should_stop: Callable[[], bool] = lambda: False, *,
             slice_s: float = 0.1) -> float:
        """Sleep the next delay, in slices so a stop is seen at once; the
        delay it chose."""
        delay = self.next_delay()
        deadline = time.monotonic() + delay
        while not should_stop():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(slice_s, left))
        return delay
