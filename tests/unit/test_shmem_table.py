"""Mapping table: lookup, overlap refusal, exact removal; checked against an interval model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from emulator.shmem.table import MappingTable, NotMappedError, OverlapError


@pytest.fixture
def table() -> MappingTable[str]:
    t: MappingTable[str] = MappingTable()
    t.insert(0x1000, 0x1000, "a")
    t.insert(0x3000, 0x2000, "b")
    t.insert(0x8000, 0x1000, "c")
    return t


def test_lookup_finds_the_containing_mapping(table: MappingTable[str]) -> None:
    assert table.lookup(0x0FFF) is None
    assert table.lookup(0x1000) == "a"
    assert table.lookup(0x1FFF) == "a"
    assert table.lookup(0x2000) is None
    assert table.lookup(0x4FFF) == "b"
    assert table.lookup(0x5000) is None
    assert table.lookup(0x8FFF) == "c"
    assert table.lookup(0x9000) is None
    assert table.entry(0x3800) == (0x3000, 0x2000, "b")
    assert table.entry(0x2800) is None


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0x1000, 0x1000),
        (0x0800, 0x1000),
        (0x1800, 0x100),
        (0x1FFF, 2),
        (0x2000, 0x7000),
        (0, 1 << 20),
    ],
)
def test_overlapping_insert_is_refused_without_change(
    table: MappingTable[str], offset: int, length: int
) -> None:
    before = list(table)
    with pytest.raises(OverlapError):
        table.insert(offset, length, "x")
    assert list(table) == before


def test_adjacent_inserts_are_fine(table: MappingTable[str]) -> None:
    table.insert(0x2000, 0x1000, "between")
    table.insert(0x0, 0x1000, "first")
    table.insert(0x5000, 0x3000, "gap")
    assert [e[2] for e in table] == ["first", "a", "between", "b", "gap", "c"]
    assert len(table) == 6


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0x3000, 0x1000),
        (0x4000, 0x1000),
        (0x2000, 0x1000),
        (0x1000, 0x4000),
        (0x3000, 0x3000),
        (0x3000, 0),
    ],
)
def test_remove_needs_exactly_one_whole_mapping(
    table: MappingTable[str], offset: int, length: int
) -> None:
    before = list(table)
    with pytest.raises(NotMappedError):
        table.remove(offset, length)
    assert list(table) == before


def test_remove_iterate_clear(table: MappingTable[str]) -> None:
    assert table.remove(0x3000, 0x2000) == "b"
    assert table.lookup(0x3000) is None
    assert [(o, n) for o, n, _ in table] == [(0x1000, 0x1000), (0x8000, 0x1000)]
    table.clear()
    assert len(table) == 0
    assert list(table) == []
    assert table.lookup(0x1000) is None


def test_intersecting_clips_nothing_and_keeps_order(table: MappingTable[str]) -> None:
    assert [v for _, _, v in table.intersecting(0x1800, 0x2000)] == ["a", "b"]
    assert [v for _, _, v in table.intersecting(0x2000, 0x1000)] == []
    assert [v for _, _, v in table.intersecting(0, 1 << 20)] == ["a", "b", "c"]
    assert [v for _, _, v in table.intersecting(0x4FFF, 1)] == ["b"]


def test_non_positive_length_is_a_caller_bug(table: MappingTable[str]) -> None:
    with pytest.raises(ValueError, match="positive"):
        table.insert(0x10000, 0, "x")


SPACE = 64
offsets = st.integers(min_value=0, max_value=SPACE - 1)
lengths = st.integers(min_value=1, max_value=12)


class TableMachine(RuleBasedStateMachine):
    """The table and a plain list of intervals must agree after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.table: MappingTable[int] = MappingTable()
        self.model: list[tuple[int, int, int]] = []
        self.counter = 0

    def _model_overlaps(self, offset: int, length: int) -> bool:
        return any(o < offset + length and offset < o + n for o, n, _ in self.model)

    @rule(offset=offsets, length=lengths)
    def insert(self, offset: int, length: int) -> None:
        self.counter += 1
        if self._model_overlaps(offset, length):
            assert self.table.overlaps(offset, length)
            with pytest.raises(OverlapError):
                self.table.insert(offset, length, self.counter)
        else:
            assert not self.table.overlaps(offset, length)
            self.table.insert(offset, length, self.counter)
            self.model.append((offset, length, self.counter))

    @rule(offset=offsets, length=lengths)
    def remove_arbitrary(self, offset: int, length: int) -> None:
        match = [m for m in self.model if m[0] == offset and m[1] == length]
        if match:
            assert self.table.remove(offset, length) == match[0][2]
            self.model.remove(match[0])
        else:
            with pytest.raises(NotMappedError):
                self.table.remove(offset, length)

    @precondition(lambda self: bool(self.model))
    @rule(index=st.integers(min_value=0))
    def remove_existing(self, index: int) -> None:
        offset, length, value = self.model.pop(index % len(self.model))
        assert self.table.remove(offset, length) == value

    @rule(offset=offsets)
    def lookup(self, offset: int) -> None:
        expected = [m for m in self.model if m[0] <= offset < m[0] + m[1]]
        assert len(expected) <= 1
        assert self.table.lookup(offset) == (expected[0][2] if expected else None)
        assert self.table.entry(offset) == (expected[0] if expected else None)

    @rule(offset=offsets, length=lengths)
    def intersecting(self, offset: int, length: int) -> None:
        expected = sorted(m for m in self.model if m[0] < offset + length and offset < m[0] + m[1])
        assert self.table.intersecting(offset, length) == expected

    @rule()
    def clear(self) -> None:
        self.table.clear()
        self.model.clear()

    @invariant()
    def same_contents(self) -> None:
        assert list(self.table) == sorted(self.model)
        assert len(self.table) == len(self.model)


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_table_matches_model = TableMachine.TestCase
