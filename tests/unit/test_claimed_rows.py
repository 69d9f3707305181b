"""The worker's claimed rows are read with two shortcuts (pulsed/db/rows.py):
load_json for jsonb payloads, job_from_row for the Jobs. Each must give
exactly what the plain way gives (json.loads, Job(*row)), errors included."""

from __future__ import annotations

import json
import uuid
from dataclasses import FrozenInstanceError, fields
from datetime import datetime, timezone

import pytest

from pulsed.db.rows import _CLAIMED_COLUMNS, job_from_row, load_json
from pulsed.jobs import Job

VALID = [
    b'{"i": 1}', b'{}', b'[]', b'"text"', b'12', b'-1.5e300', b'1e400', b'null', b'true',
    '{"ü": "☃ \\u00e9 \\ud83d\\ude00"}'.encode(), b'{"a": {"b": [1, 2.5, null, "x"]}}',
    b'{"a": 1, "a": 2}',  # duplicate keys: the last wins, as json.loads has it
    b'  {"a": 1}', b'{"a": 1}  ', b'\t[1]\n',  # json (not jsonb) keeps its spaces
    b'\xef\xbb\xbf{"bom": 1}',  # a byte order mark: json.loads drops it
]


@pytest.mark.parametrize("data", VALID)
def test_load_json_reads_what_json_loads_reads(data: bytes) -> None:
    assert load_json(data) == json.loads(data)
    assert type(load_json(data)) is type(json.loads(data))


@pytest.mark.parametrize("data", [
    b'{"a": 1} x', b'{"a": ', b'', b'   ', b'{"a": 1}{"b": 2}', b'\xff{"a": 1}', b'nul',
    b'1' * 5000,  # past Python's int digit limit: ValueError, an unreadable value
])
def test_load_json_fails_as_json_loads_fails(data: bytes) -> None:
    with pytest.raises(Exception) as expected:
        json.loads(data)
    with pytest.raises(type(expected.value)) as got:
        load_json(data)
    assert str(got.value) == str(expected.value)


def _row() -> tuple:
    now = datetime.now(timezone.utc)
    return (7, "email", "mail", {"to": "a@b"}, 3, 1, 20, "key-1", now, now, 2.5, uuid.uuid4(),
            now)


def test_job_from_row_is_job_of_the_row() -> None:
    row = _row()
    job = job_from_row(row)
    assert job == Job(*row)
    assert vars(job) == vars(Job(*row))
    assert job.lease_token == row[-2] and job.started_at == row[-1]
    assert "lease_token" not in repr(job)  # the dataclass's own methods still apply
    with pytest.raises(FrozenInstanceError):
        job.priority = 0  # type: ignore[misc]


def test_the_claims_columns_are_jobs_fields_in_order() -> None:
    """job_from_row pairs values with Job's fields by position: the claim's
    RETURNING list must follow Job's field order (timeout_s is `timeout`)."""
    names = [field.name for field in fields(Job)]
    assert [c.replace("timeout_s", "timeout") for c in _CLAIMED_COLUMNS] == names
