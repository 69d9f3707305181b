"""The master's ring of children's log lines: whole lines, bounded memory,
kept across a child's restart, read by sequence number to follow."""

from __future__ import annotations

import os
import selectors
from collections.abc import Iterator

import pytest
from hypothesis import given, settings, strategies as st

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


def test_lines_read_together_are_kept_and_followed_line_by_line(selector) -> None:
    """A read's lines are held together but counted, dropped and followed
    one by one: the place keeps exactly its last `lines`, and `after` may
    fall inside a read."""
    ring = LogRing(write_through=None, lines=5, max_bytes=1000)
    _child_writes(ring, selector, "worker", 1, b"1\n2\n3\n", b"4\n5\n6\n7\n")
    kept = ring.tail()
    assert [l.text for l in kept] == ["3", "4", "5", "6", "7"]
    assert [l.text for l in ring.tail(after=kept[1].seq)] == ["5", "6", "7"]
    assert [l.text for l in ring.tail(lines=2)] == ["6", "7"]
    assert [l.seq for l in kept] == list(range(kept[0].seq, kept[0].seq + 5))


def test_the_byte_budget_drops_the_oldest_lines_of_a_read_not_the_whole_read(selector) -> None:
    ring = LogRing(write_through=None, max_bytes=10)
    _child_writes(ring, selector, "worker", 1, b"aaaa\nbbbb\ncccc\n")
    assert [l.text for l in ring.tail()] == ["bbbb", "cccc"]


_places = st.sampled_from([("worker", 1), ("worker", 2), ("api", 0)])
_reads = st.lists(st.tuples(_places, st.lists(st.text("ab\u00e9", max_size=12), min_size=1,
                                                   max_size=6)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(reads=_reads, keep=st.integers(1, 6), budget=st.integers(1, 80),
       want=st.integers(0, 20), after=st.integers(0, 40))
def test_the_ring_keeps_what_a_line_by_line_ring_keeps(reads, keep, budget, want, after) -> None:
    """Against a model that keeps each line on its own (as the ring once
    did): the same lines, sequence numbers and order for any reads, line
    limit, byte budget and query."""
    ring = LogRing(write_through=None, lines=keep, max_bytes=budget)
    model: list[tuple[int, tuple[str, int], bytes]] = []
    seq = 0
    for place, texts in reads:
        lines = [t.encode() for t in texts]
        ring._add(logring._Source(*place), lines)
        for raw in lines:
            seq += 1
            model.append((seq, place, raw))
            mine = [m for m in model if m[1] == place]
            if len(mine) > keep:
                model.remove(mine[0])
        while sum(len(m[2]) for m in model) > budget:
            model.pop(0)
    expected = [(s, p, raw.decode()) for s, p, raw in model if s > after][-want:] if want else []
    got = [(l.seq, (l.role, l.index), l.text) for l in ring.tail(lines=want, after=after)]
    assert got == expected
    for place in {p for p, _ in reads}:
        got = [l.text for l in ring.tail(role=place[0], index=place[1], lines=100)]
        assert got == [raw.decode() for _, p, raw in model if p == place]
