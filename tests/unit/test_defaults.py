"""One source for every default: the config schema (pulsed/config.py).

run_worker() builds a WorkerOptions from its own defaults, the daemon from
[worker]; a default that differs between the two makes a job behave one way
in a test and another in production (as aging once did: 0 vs 60 s).
"""

from __future__ import annotations

import dataclasses

from pulsed.config import WorkerConfig
from pulsed.worker import WorkerOptions


def _defaults(cls: type) -> dict[str, object]:
    result = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            result[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            result[field.name] = field.default_factory()
    return result


def test_worker_options_defaults_are_the_config_schemas():
    options, configured = _defaults(WorkerOptions), _defaults(WorkerConfig)
    shared = options.keys() & configured.keys()
    # The settings both have: a rename on one side must not drop one from the check.
    assert {"lease_ttl", "poll_interval", "prefetch", "concurrency", "queues", "aging",
            "poison_after", "max_result_bytes", "cancel_grace"} <= shared
    differing = {name: (options[name], configured[name]) for name in shared
                 if options[name] != configured[name]}
    assert differing == {}, f"WorkerOptions vs WorkerConfig defaults: {differing}"
