"""Guest RAM as the vfio-user client hands it over with DMA_MAP.

QEMU backs guest RAM with a shared memfd and passes an fd with each DMA_MAP. We map each
region into our own address space once: the host address is what the vhost-user back-end
gets as ``userspace_addr`` in SET_MEM_TABLE, and the fd (a dup of the message's, owned here) is
what it mmaps.
Regions the client sends without an fd are recorded but cannot be handed to a back-end.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from emulator.mman import (
    MAP_SHARED,
    MAX_FILE_OFFSET,
    PROT_READ,
    PROT_WRITE,
    map_memory,
    unmap_memory,
)
from wire.errors import RemoteProtocolError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DmaRegion:
    """One DMA_MAP: ``size`` bytes of guest physical space at ``gpa``."""

    gpa: int
    size: int
    readable: bool
    writable: bool
    fd: int | None
    fd_offset: int
    host_addr: int | None

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end


class GuestMemory:
    """The client's DMA regions, ordered by guest physical address. Owns their (dup-ed) fds."""

    def __init__(self, max_regions: int = 65535) -> None:
        self.max_regions = max_regions
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[DmaRegion]:
        return iter(list(self._regions))

    def map(
        self,
        gpa: int,
        size: int,
        *,
        fd: int | None,
        fd_offset: int = 0,
        readable: bool = True,
        writable: bool = True,
    ) -> DmaRegion:
        """Add a region. ``fd`` is lent: the region keeps a ``dup`` of it for SET_MEM_TABLE."""
        self._check_new(gpa, size)
        host_addr = kept_fd = None
        if fd is not None:
            host_addr = _mmap_fd(fd, size, fd_offset, writable)
            try:
                kept_fd = os.dup(fd)
            except OSError as exc:
                unmap_memory(host_addr, size)
                raise RemoteProtocolError(f"cannot keep the DMA fd: {exc}", errno.EMFILE) from exc
        region = DmaRegion(gpa, size, readable, writable, kept_fd, fd_offset, host_addr)
        index = bisect.bisect_left(self._starts, gpa)
        self._starts.insert(index, gpa)
        self._regions.insert(index, region)
        if fd is None:
            logger.info("DMA region %#x+%#x has no fd: a back-end cannot reach it", gpa, size)
        self._notify()
        return region

    def unmap(self, gpa: int, size: int) -> int:
        """Remove every region inside ``[gpa, gpa+size)``; a region cut in two is an error."""
        end = gpa + size
        doomed = [r for r in self._regions if r.gpa < end and gpa < r.end]
        for region in doomed:
            if region.gpa < gpa or region.end > end:
                raise RemoteProtocolError(
                    f"DMA_UNMAP {gpa:#x}+{size:#x} splits region {region.gpa:#x}+{region.size:#x}",
                    errno.EINVAL,
                )
        for region in doomed:
            self._remove(region)
        if doomed:
            self._notify()
        return len(doomed)

    def unmap_all(self) -> None:
        for region in list(self._regions):
            self._remove(region)
        self._notify()

    def find(self, gpa: int, size: int = 1) -> DmaRegion | None:
        """The region holding all of ``[gpa, gpa+size)``, if one does."""
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index >= 0 and self._regions[index].contains(gpa, size):
            return self._regions[index]
        return None

    def host_address(self, gpa: int, size: int = 1) -> int | None:
        """Our address for guest physical ``gpa`` (what vrings are given as), if mapped."""
        region = self.find(gpa, size)
        if region is None or region.host_addr is None:
            return None
        return region.host_addr + (gpa - region.gpa)

    def close(self) -> None:
        for region in list(self._regions):
            self._remove(region)

    def _check_new(self, gpa: int, size: int) -> None:
        if size <= 0 or gpa < 0 or gpa + size > 1 << 64:
            raise RemoteProtocolError(f"DMA_MAP {gpa:#x}+{size:#x} is not a valid range")
        if len(self._regions) >= self.max_regions:
            raise RemoteProtocolError("too many DMA regions", errno.ENOSPC)
        index = bisect.bisect_left(self._starts, gpa)
        neighbours = self._regions[max(index - 1, 0) : index + 1]
        for other in neighbours:
            if other.gpa < gpa + size and gpa < other.end:
                raise RemoteProtocolError(
                    f"DMA_MAP {gpa:#x}+{size:#x} overlaps {other.gpa:#x}+{other.size:#x}",
                    errno.EEXIST,
                )

    def _remove(self, region: DmaRegion) -> None:
        index = self._regions.index(region)
        del self._regions[index]
        del self._starts[index]
        if region.host_addr is not None:
            unmap_memory(region.host_addr, region.size)
        if region.fd is not None:
            os.close(region.fd)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()


def _mmap_fd(fd: int, size: int, offset: int, writable: bool) -> int:
    prot = PROT_READ | (PROT_WRITE if writable else 0)
    if offset % mmap.PAGESIZE or not 0 <= offset < MAX_FILE_OFFSET:
        raise RemoteProtocolError(f"DMA_MAP fd offset {offset:#x} is not a page-aligned off_t")
    try:
        return map_memory(0, size, prot, MAP_SHARED, fd=fd, offset=offset)
    except OSError as exc:
        code = exc.errno or errno.EINVAL
        raise RemoteProtocolError(f"cannot mmap DMA region fd: {exc.strerror}", code) from exc
