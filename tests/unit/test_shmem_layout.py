"""BAR layout: packing, power-of-two sizing, lookup by BAR offset, and refusals."""

from __future__ import annotations

import pytest

from emulator.errors import ConfigError
from emulator.shmem.layout import MAX_BAR_SIZE, PAGE_SIZE, RegionLayout, ShmemLayout

MIB = 1 << 20


def test_two_mib_plus_one_mib_packs_into_a_four_mib_bar() -> None:
    layout = ShmemLayout.from_sizes({0: 2 * MIB, 1: MIB})
    assert layout.bar_size == 4 * MIB
    assert layout.regions == (RegionLayout(0, 0, 2 * MIB), RegionLayout(1, 2 * MIB, MIB))


def test_three_mib_alone_rounds_up_to_four() -> None:
    layout = ShmemLayout.from_sizes({0: 3 * MIB})
    assert layout.bar_size == 4 * MIB
    assert layout.regions == (RegionLayout(0, 0, 3 * MIB),)


def test_unused_shmids_are_skipped_and_order_is_by_shmid() -> None:
    layout = ShmemLayout.from_sizes({7: PAGE_SIZE, 2: 0, 3: 2 * PAGE_SIZE, 255: PAGE_SIZE})
    assert [(r.shmid, r.bar_offset, r.size) for r in layout.regions] == [
        (3, 0, 2 * PAGE_SIZE),
        (7, 2 * PAGE_SIZE, PAGE_SIZE),
        (255, 3 * PAGE_SIZE, PAGE_SIZE),
    ]
    assert layout.bar_size == 4 * PAGE_SIZE
    assert layout.region(2) is None
    assert layout.region(7) == RegionLayout(7, 2 * PAGE_SIZE, PAGE_SIZE)


@pytest.mark.parametrize(
    ("sizes", "bar_size"),
    [
        ({}, PAGE_SIZE),
        ({0: 0}, PAGE_SIZE),
        ({0: PAGE_SIZE}, PAGE_SIZE),
        ({0: PAGE_SIZE, 1: PAGE_SIZE}, 2 * PAGE_SIZE),
        ({0: PAGE_SIZE, 1: PAGE_SIZE, 2: PAGE_SIZE}, 4 * PAGE_SIZE),
        ({0: 1 << 30, 1: PAGE_SIZE}, 2 << 30),
        ({0: MAX_BAR_SIZE}, MAX_BAR_SIZE),
        ({0: MAX_BAR_SIZE // 2, 1: MAX_BAR_SIZE // 2}, MAX_BAR_SIZE),
    ],
)
def test_bar_size_is_smallest_power_of_two_holding_everything(
    sizes: dict[int, int], bar_size: int
) -> None:
    layout = ShmemLayout.from_sizes(sizes)
    assert layout.bar_size == bar_size
    total = sum(sizes.values())
    assert total <= layout.bar_size
    assert layout.bar_size == PAGE_SIZE or layout.bar_size // 2 < total


def test_regions_are_page_aligned_and_contiguous() -> None:
    layout = ShmemLayout.from_sizes({i: (i + 1) * PAGE_SIZE for i in range(0, 256, 5)})
    offset = 0
    for region in layout.regions:
        assert region.bar_offset == offset
        assert region.bar_offset % PAGE_SIZE == 0
        offset = region.end
    assert offset <= layout.bar_size


def test_locate_maps_bar_offsets_to_regions_and_padding_to_none() -> None:
    layout = ShmemLayout.from_sizes({0: 2 * MIB, 1: MIB})
    first, second = layout.regions
    assert layout.locate(0) == (first, 0)
    assert layout.locate(2 * MIB - 1) == (first, 2 * MIB - 1)
    assert layout.locate(2 * MIB) == (second, 0)
    assert layout.locate(3 * MIB - 1) == (second, MIB - 1)
    assert layout.locate(3 * MIB) is None
    assert layout.locate(4 * MIB) is None
    assert layout.locate(-1) is None


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({0: 1000}, "multiple of 4096"),
        ({0: PAGE_SIZE + 1}, "multiple of 4096"),
        ({0: -PAGE_SIZE}, "multiple of 4096"),
        ({256: PAGE_SIZE}, "outside 0..255"),
        ({-1: PAGE_SIZE}, "outside 0..255"),
        ({0: MAX_BAR_SIZE, 1: PAGE_SIZE}, "64-bit BAR"),
        ({0: 2 * MAX_BAR_SIZE}, "64-bit BAR"),
    ],
)
def test_invalid_layouts_are_refused_clearly(sizes: dict[int, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ShmemLayout.from_sizes(sizes)


def test_non_integer_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="not an integer"):
        ShmemLayout.from_sizes({0: 4096.0})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="not an integer"):
        ShmemLayout.from_sizes({0: True})
