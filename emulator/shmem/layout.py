"""Where each VIRTIO Shared Memory Region sits inside the shared-memory BAR.

Regions are packed back to back in shmid order and the BAR is the next power of two, so any mix
of page-multiple sizes fits (QEMU 11.1's own front-end requires power-of-two region sizes and
aborts on e.g. 2 MiB + 1 MiB; we do not). The PCI code turns each region into one
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG capability with ``id = shmid``. The rules a layout must keep
live in ``vhost_user.shmem``, which the back-end library applies too, in the same words.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

from emulator.errors import ConfigError
from vhost_user.shmem import MAX_BAR_SIZE, MAX_SHMID, PAGE_SIZE, RegionRefused, check_regions

__all__ = ["MAX_BAR_SIZE", "MAX_SHMID", "PAGE_SIZE", "RegionLayout", "ShmemLayout"]


@dataclass(frozen=True, slots=True)
class RegionLayout:
    """One region: ``size`` bytes at ``bar_offset`` in the BAR."""

    shmid: int
    bar_offset: int
    size: int

    @property
    def end(self) -> int:
        """BAR offset one past the region's last byte."""
        return self.bar_offset + self.size


@dataclass(frozen=True, slots=True)
class ShmemLayout:
    """The whole BAR: its power-of-two size and the regions in it, ordered by BAR offset."""

    bar_size: int
    regions: tuple[RegionLayout, ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(r.bar_offset for r in self.regions))

    @classmethod
    def from_sizes(cls, sizes: Mapping[int, int]) -> ShmemLayout:
        """Lay out ``{shmid: size}``; size 0 marks an unused shmid and gets no region.

        Raises ``ConfigError`` naming the region and the rule (``vhost_user.shmem``) for a
        shmid outside 0..255, a size that is negative or not a multiple of ``PAGE_SIZE``, or a
        total that no 64-bit BAR can hold.
        """
        try:
            check_regions(sizes)
        except RegionRefused as exc:
            raise ConfigError(str(exc)) from exc
        regions: list[RegionLayout] = []
        offset = 0
        for shmid in sorted(sizes):
            size = sizes[shmid]
            if size:
                regions.append(RegionLayout(shmid, offset, size))
                offset += size
        bar_size = max(PAGE_SIZE, 1 << (offset - 1).bit_length()) if offset else PAGE_SIZE
        return cls(bar_size, tuple(regions))

    def region(self, shmid: int) -> RegionLayout | None:
        """The region with this shmid, or None if the shmid is unused."""
        for region in self.regions:
            if region.shmid == shmid:
                return region
        return None

    def locate(self, bar_offset: int) -> tuple[RegionLayout, int] | None:
        """``(region, offset_in_region)`` for a BAR offset, or None for padding/outside."""
        index = bisect.bisect_right(self._starts, bar_offset) - 1
        if index < 0:
            return None
        region = self.regions[index]
        if bar_offset >= region.end:
            return None
        return region, bar_offset - region.bar_offset
