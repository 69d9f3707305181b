"""The master's ring of children's log lines: whole lines, bounded memory,
kept across a child's restart, read by sequence number to follow."""

from __future__ import annotations

import os
import selectors
from collections.abc import Iterator

import pytest

from pulsed import logring
from pulsed.logring import LogRing


@pytest.fixture
def selector() -> Iterator[selectors.BaseSelector]:
    with selectors.DefaultSelector() as sel:
        yield sel


def _child_writes(ring: LogRing, selector: selectors.BaseSelector, role: str, index: int,
                  *chunks: bytes) -> None:
    """A child's stderr: write the chunks, close it (the child exits), and
    let the master read until EOF."""
    read_fd, write_fd = ring.pipe()
    child_end = os.dup(write_fd)
    ring.watch(selector, read_fd, write_fd, role, index)
    for chunk in chunks:
        os.write(child_end, chunk)
        ring.read(read_fd)
    os.close(child_end)
    ring.drain()


def test_lines_are_kept_whole_and_passed_on_whole(selector, tmp_path) -> None:
    through = os.open(tmp_path / "stderr", os.O_WRONLY | os.O_CREAT)
    ring = LogRing(write_through=through)
    _child_writes(ring, selector, "worker", 1, b"one\ntw", b"o\nthree without newline")
    os.close(through)
    assert [l.text for l in ring.tail()] == ["one", "two", "three without newline"]
    assert (tmp_path / "stderr").read_bytes() == b"one\ntwo\nthree without newline\n"


def test_a_place_keeps_the_last_lines_across_restarts(selector) -> None:
    ring = LogRing(write_through=None, lines=3)
    _child_writes(ring, selector, "worker", 2, b"a\nb\n")
    _child_writes(ring, selector, "worker", 2, b"c\nd\n")  # its successor
    _child_writes(ring, selector, "scheduler", 0, b"s\n")
    assert [l.text for l in ring.tail(role="worker", index=2)] == ["b", "c", "d"]
    assert [l.text for l in ring.tail(lines=2)] == ["d", "s"]
    assert [(l.role, l.text) for l in ring.tail(role="scheduler")] == [("scheduler", "s")]


def test_a_long_line_is_cut_and_memory_stays_bounded(selector) -> None:
    ring = LogRing(write_through=None, lines=10)
    _child_writes(ring, selector, "api", 0, b"x" * (logring.MAX_LINE_BYTES * 3) + b"\n",
                  b"y\n" * 100)
    lines = ring.tail(lines=1000)
    assert len(lines) == 10 and all(len(l.text) <= logring.MAX_LINE_BYTES + 8 for l in lines)


def test_following_reads_only_newer_lines(selector) -> None:
    ring = LogRing(write_through=None)
    _child_writes(ring, selector, "worker", 1, b"old\n")
    seen = ring.last_seq
    _child_writes(ring, selector, "worker", 1, b"new\n")
    assert [l.text for l in ring.tail(after=seen)] == ["new"]
    assert ring.tail(after=ring.last_seq) == []


def test_all_places_together_stay_within_the_byte_budget(selector) -> None:
    ring = LogRing(write_through=None, max_bytes=100)
    for index in range(1, 6):
        _child_writes(ring, selector, "worker", index, f"{index}{'x' * 29}\n".encode())
    kept = ring.tail(lines=1000)
    assert sum(len(l.text) for l in kept) <= 100
    assert [l.index for l in kept] == [3, 4, 5]  # the oldest lines went first
