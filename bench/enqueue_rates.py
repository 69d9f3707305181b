"""Enqueue rates, single and bulk, with and without idempotency keys.

    python bench/enqueue_rates.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Creates a database of its own on that server (dropped at the end), migrates
it, then times rounds of: single enqueues (one transaction each, as an
application does), then batches of enqueue_many, each without and with
idempotency keys (all new, so no conflicts), and with unique_while and
unique_for where the code has them, interleaved round by round so
a load change on the host hits every shape alike. Prints each shape's
median rate over the rounds, in jobs per second, as one JSON line.
Used to check that scoped uniqueness (issue 17) kept the enqueue paths'
speed: run it against the code before and after, alternately.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

import pulsed
from pulsed.db.migrate import migrate

DEFAULT_SINGLE = 2000  # single enqueues in all, spread over the rounds
DEFAULT_BATCHES = 20   # batches in all, spread over the rounds
DEFAULT_BATCH_SIZE = 1000
DEFAULT_ROUNDS = 10
_keys = itertools.count()


def _key(keyed: bool) -> str | None:
    return f"k{os.getpid()}-{next(_keys)}" if keyed else None


# The scoped shapes (unique_while, unique_for), where the code has them.
SCOPES = {"unique_while": {"unique_while": "unfinished"}, "unique_for": {"unique_for": 3600.0}}
HAS_SCOPES = "unique_while" in inspect.signature(pulsed.enqueue).parameters


def single_rate(conn: psycopg.Connection, count: int, *, keyed: bool,
                scope: dict[str, Any] | None = None) -> float:
    started = time.perf_counter()
    for i in range(count):
        with conn.transaction():
            pulsed.enqueue(conn, "bench", {"i": i}, idempotency_key=_key(keyed), **(scope or {}))
    return count / (time.perf_counter() - started)


def bulk_rate(conn: psycopg.Connection, batches: int, size: int, *, keyed: bool,
              scope: dict[str, Any] | None = None) -> float:
    specs = [[{"type": "bench", "payload": {"i": i}, "idempotency_key": _key(keyed),
               **(scope or {})} for i in range(size)] for _ in range(batches)]
    started = time.perf_counter()
    for batch in specs:
        with conn.transaction():
            pulsed.enqueue_many(conn, batch)
    return batches * size / (time.perf_counter() - started)


def measure(dsn: str, args: argparse.Namespace) -> dict[str, float]:
    shapes: dict[str, Callable[[psycopg.Connection], float]] = {
        "single": lambda c: single_rate(c, args.single // args.rounds, keyed=False),
        "single_keyed": lambda c: single_rate(c, args.single // args.rounds, keyed=True),
        "bulk": lambda c: bulk_rate(c, args.batches // args.rounds, args.batch_size,
                                    keyed=False),
        "bulk_keyed": lambda c: bulk_rate(c, args.batches // args.rounds, args.batch_size,
                                          keyed=True),
    }
    for name, scope in SCOPES.items() if HAS_SCOPES else ():
        shapes[f"single_{name}"] = functools.partial(
            lambda c, scope: single_rate(c, args.single // args.rounds, keyed=True,
                                         scope=scope), scope=scope)
        shapes[f"bulk_{name}"] = functools.partial(
            lambda c, scope: bulk_rate(c, args.batches // args.rounds, args.batch_size,
                                       keyed=True, scope=scope), scope=scope)
    rates: dict[str, list[float]] = {name: [] for name in shapes}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(args.rounds):
            for name, shape in shapes.items():
                rates[name].append(shape(conn))
            conn.execute("TRUNCATE pulse_jobs CASCADE")  # every round starts alike
    return {name: round(statistics.median(values)) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a superuser DSN on the server to use")
    parser.add_argument("--single", type=int, default=DEFAULT_SINGLE)
    parser.add_argument("--batches", type=int, default=DEFAULT_BATCHES)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    name = f"bench_enqueue_{os.getpid()}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(args.dsn, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
        result = measure(dsn, args)
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
    print(json.dumps({"label": args.label, "source": os.path.dirname(pulsed.__file__),
                      **result}))


if __name__ == "__main__":
    main()
