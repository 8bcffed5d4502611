"""Where each VIRTIO Shared Memory Region sits inside the shared-memory BAR.

Regions are packed back to back in shmid order and the BAR is the next power of two, so any mix
of page-multiple sizes fits (QEMU 11.1's own front-end requires power-of-two region sizes and
aborts on e.g. 2 MiB + 1 MiB; we do not). The PCI code turns each region into one
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG capability with ``id = shmid``.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

from emulator.errors import ConfigError

PAGE_SIZE = 4096
MAX_SHMID = 255
MAX_BAR_SIZE = 1 << 63


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

        Raises ``ConfigError`` for a shmid outside 0..255, a size that is negative or not a
        multiple of ``PAGE_SIZE``, or a total that no 64-bit BAR can hold.
        """
        regions: list[RegionLayout] = []
        offset = 0
        for shmid in sorted(sizes):
            size = sizes[shmid]
            if isinstance(shmid, bool) or not isinstance(shmid, int):
                raise ConfigError(f"shmid {shmid!r} is not an integer")
            if not 0 <= shmid <= MAX_SHMID:
                raise ConfigError(f"shmid {shmid} is outside 0..{MAX_SHMID}")
            if isinstance(size, bool) or not isinstance(size, int):
                raise ConfigError(f"shmid {shmid}: size {size!r} is not an integer")
            if size < 0 or size % PAGE_SIZE:
                raise ConfigError(
                    f"shmid {shmid}: size {size:#x} is not a non-negative multiple of {PAGE_SIZE}"
                )
            if size == 0:
                continue
            regions.append(RegionLayout(shmid, offset, size))
            offset += size
            if offset > MAX_BAR_SIZE:
                raise ConfigError(
                    f"shared memory regions total {offset:#x} bytes, more than a 64-bit BAR "
                    f"can hold ({MAX_BAR_SIZE:#x})"
                )
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
